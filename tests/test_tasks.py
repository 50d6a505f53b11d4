import json

import torch

from bayesprune.run.cli import main
from bayesprune.core.config import DataConfig
from bayesprune.inputs.data import split_corpus
from bayesprune.inputs.pretrained import load_model
from bayesprune.evaluation.tasks import CONTEXT_WORDS, cloze_items, continuation_items, run_tasks
from tests.test_cli import FIT_ARGS


def test_items_come_from_the_text_and_are_reproducible(corpus_dir):
    documents = split_corpus(DataConfig(path=str(corpus_dir)))["test"]
    text = " ".join(" ".join(d.text.split()) for d in documents)
    items = continuation_items(documents, 20, seed=1)
    assert items == continuation_items(documents, 20, seed=1) != continuation_items(documents, 20, seed=2)
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        assert f"{item['context']} {item['choices'][item['answer']]}" in text
    assert sorted({i["answer"] for i in items}) == [0, 1, 2, 3]
    for item in cloze_items(documents, 20):
        assert len(item["context"].split()) == CONTEXT_WORDS and item["target"].isalpha()
        assert f"{item['context']} {item['target']}" in text


def continuation_accuracy(model, tokenizer, items) -> float:
    """The multiple-choice accuracy computed here, as lm-eval defines it (summed log-likelihood of each choice)."""
    right = 0
    for item in items:
        context = tokenizer(item["context"])["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(f"{item['context']} {choice}")["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1]
            targets = ids[0, 1:]
            scores.append(logp[len(context) - 1:, :].gather(-1, targets[len(context) - 1:, None]).sum().item())
        right += int(max(range(len(scores)), key=scores.__getitem__) == item["answer"])
    return right / len(items)


def test_lm_eval_scores_an_extracted_per_layer_model(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--target", "0.6", *FIT_ARGS]) == 0
    capsys.readouterr()
    extracted = run / "extracted"
    assert "per_layer_config" in json.loads((extracted / "config.json").read_text())
    assert main(["evaluate", str(extracted), "--data", str(corpus_dir), "--eval-tokens", "256",
                 "--eval-window", "64", "--tasks", "continuation,cloze", "--task-limit", "12"]) == 0
    scores = json.loads(capsys.readouterr().out)["tasks"]
    assert scores["continuation"]["sample_len"] == scores["cloze"]["sample_len"] == 12
    assert 0 <= scores["cloze"]["acc"] <= 1 and scores["cloze"]["perplexity"] > 1
    model, tokenizer = load_model(str(extracted))
    documents = split_corpus(DataConfig(path=str(corpus_dir)))["test"]
    assert scores["continuation"]["acc"] == continuation_accuracy(model, tokenizer, continuation_items(documents, 12))
    again = run_tasks(model, tokenizer, ["continuation"], documents, limit=12)
    assert again["continuation"]["acc"] == scores["continuation"]["acc"]


def test_unknown_tasks_get_a_clear_error(tiny_model_dir, corpus_dir, capsys):
    assert main(["evaluate", str(tiny_model_dir), "--data", str(corpus_dir), "--tasks", "continuation,,"]) == 2
    assert "comma-separated task names" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_model_dir), "--data", str(corpus_dir), "--eval-tokens", "256",
                 "--eval-window", "64", "--tasks", "no_such_task", "--task-limit", "2"]) == 2
    assert "could not run ['no_such_task']" in capsys.readouterr().err

"""Models by hub id: a populated Hugging Face cache works offline; a missing one gets a clear error."""

import shutil

import pytest
import torch

from bayesprune.run.cli import main
from bayesprune.inputs.pretrained import load_model, resolve_model

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A Hugging Face hub cache holding ``tiny-org/tiny-llama``, laid out as ``huggingface_hub`` writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / REVISION


def test_a_hub_id_loads_from_the_local_cache(hub_cache, tiny_model_dir, corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert resolve_model("tiny-org/tiny-llama") == hub_cache
    model, _ = load_model("tiny-org/tiny-llama")
    reference, _ = load_model(str(tiny_model_dir))
    ids = torch.arange(10)[None]
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    run = tmp_path / "run"
    assert main(["fit", "--model", "tiny-org/tiny-llama", "--data", str(corpus_dir), "--out", str(run),
                 "--target", "none", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256",
                 "--eval-window", "64"]) == 0
    assert (run / "run.json").read_text().count(str(hub_cache)) == 1


def test_a_hub_id_that_is_not_cached_offline_says_so(hub_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--model", "no-org/no-model", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "hub could not be reached" in err
    assert not (tmp_path / "r").exists()

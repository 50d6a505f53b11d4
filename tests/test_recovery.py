"""Recovery fine-tuning: the cut model trained on fit text, alone and as extraction's last step."""

import json

import pytest
import torch

from bayesprune import load_pruned
from bayesprune.core.config import ExtractionConfig
from bayesprune.core.likelihood import (DistillationLikelihood, NetworkTeacher, calibration_nll, next_token_log_probs,
                                        sequence_kl)
from bayesprune.core.model import NonFiniteLossError
from bayesprune.cut.recovery import recover, recovery_steps
from bayesprune.run.cli import main
from bayesprune.run.extract_job import run_extract
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import FIT_ARGS

WINDOWS = torch.randint(0, VOCAB, (6, 12), generator=torch.Generator().manual_seed(0))


def test_recovery_trains_on_the_requested_tokens_and_lowers_the_loss():
    model = tiny_model("llama")
    tokens = WINDOWS.flatten()
    before = calibration_nll(model, WINDOWS)
    record = recover(model, tokens, num_tokens=40 * 2 * 12, seq_len=12, batch_size=2, lr=3e-3, progress=False)
    assert record["steps"] == 40 and record["tokens"] == 960 and len(record["losses"]) == 40
    assert calibration_nll(model, WINDOWS) < before


def test_recovery_stops_on_a_non_finite_loss_before_touching_the_weights():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError):
        recover(model, WINDOWS.flatten(), 100, seq_len=12, batch_size=2, progress=False)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) or torch.isnan(state[k]).any() for k in state)


def _kl(teacher, student) -> float:
    with torch.no_grad():
        return sequence_kl(next_token_log_probs(teacher(input_ids=WINDOWS).logits),
                           student(input_ids=WINDOWS).logits).sum().item()


def test_distillation_recovery_draws_the_cut_towards_the_dense_network_not_the_text():
    dense = tiny_model("llama")
    recover(dense, WINDOWS.flatten(), num_tokens=40 * 2 * 12, seq_len=12, batch_size=2, lr=1e-2, progress=False)
    student = tiny_model("llama")  # the trained network, cut
    student.load_state_dict(dense.state_dict())
    with torch.no_grad():
        for layer in student.model.layers:
            layer.mlp.down_proj.weight[:, ::2] = 0  # half of each block's neurons cut
    nll_tuned = tiny_model("llama")
    nll_tuned.load_state_dict(student.state_dict())
    kl_before = _kl(dense, student)
    kwargs = dict(num_tokens=40 * 2 * 12, seq_len=12, batch_size=2, lr=1e-3, progress=False)
    record = recover(student, WINDOWS.flatten(), likelihood=DistillationLikelihood(NetworkTeacher(dense)), **kwargs)
    recover(nll_tuned, WINDOWS.flatten(), **kwargs)
    assert record["losses"][0] == pytest.approx(kl_before / (6 * 11), rel=0.5)  # per token, on 2 of the 6 windows
    assert _kl(dense, student) < 0.5 * kl_before
    assert _kl(dense, student) < _kl(dense, nll_tuned)  # the NLL fits the windows, not the dense network
    assert calibration_nll(nll_tuned, WINDOWS) < calibration_nll(student, WINDOWS)
    assert not any(p.requires_grad for p in dense.parameters())


def test_recovery_in_bfloat16_autocast_trains_float32_weights_and_can_leave_the_embeddings():
    model = tiny_model("llama")
    embeddings = model.get_input_embeddings().weight.detach().clone()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = calibration_nll(model, WINDOWS)
    recover(model, WINDOWS.flatten(), num_tokens=30 * 2 * 12, seq_len=12, batch_size=2, lr=3e-3, embeddings=False,
            compute=torch.bfloat16, progress=False)
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    assert any("layers.0.mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    assert calibration_nll(model, WINDOWS) < before


def test_extract_fine_tunes_the_cut_of_an_adapter_run_and_records_it(tiny_model_dir, corpus_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run), "--target",
                 "none", "--units", "head,neuron", "--weights", "lora", *FIT_ARGS]) == 0
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    assert main(["extract", str(run), "--target", "0.6", "--out", str(plain), "--in-memory", "--recovery-steps", "0"]) == 0
    assert main(["extract", str(run), "--target", "0.6", "--out", str(tuned), "--recovery-steps", "6",
                 "--recovery-lr", "1e-3"]) == 0  # in memory without being asked
    record = json.loads((tuned / "bayesprune_extraction.json").read_text())
    assert record["recovery"]["steps"] == 6 and record["recovery"]["tokens"] == 6 * 4 * 32
    assert record["extraction"]["recovery_steps"] == 6 and "recovery" not in json.loads(
        (plain / "bayesprune_extraction.json").read_text())
    before, after = load_pruned(plain).state_dict(), load_pruned(tuned).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any("embed_tokens" in k for k in changed)
    with pytest.raises(ValueError, match="recovery_steps must be an integer >= 0, got -1"):
        ExtractionConfig("0.6", recovery_steps=-1)
    with pytest.raises(ValueError, match="recovery_lr must be a finite number > 0"):
        ExtractionConfig("0.6", recovery_lr=0.0)
    with pytest.raises(ValueError, match="recovery_likelihood must be one of"):
        ExtractionConfig("0.6", recovery_likelihood="kl")
    distilled = tmp_path / "distilled"
    assert main(["extract", str(run), "--target", "0.6", "--out", str(distilled), "--recovery-steps", "6",
                 "--recovery-lr", "1e-3", "--recovery-likelihood", "distillation"]) == 0
    recovery = json.loads((distilled / "bayesprune_extraction.json").read_text())["recovery"]
    assert recovery["likelihood"] == "distillation" and record["recovery"]["likelihood"] == "nll"
    assert recovery["first_loss"] < record["recovery"]["first_loss"]  # KL from the dense network, below the NLL
    distilled_state = load_pruned(distilled).state_dict()
    assert any(not torch.equal(after[k], distilled_state[k]) for k in after)
    with pytest.raises(ValueError, match="need it in memory"):
        run_extract(run, ExtractionConfig("0.6", recovery_steps=2), tmp_path / "s", streaming=True)
    assert not (tmp_path / "s").exists()


def test_the_fit_job_fine_tunes_its_cut_and_says_so(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run), "--target",
                 "0.6", "--units", "head,neuron", "--recovery-steps", "3", *FIT_ARGS]) == 0
    assert "recovery: 3 steps on the fit split, nll" in capsys.readouterr().out
    report = json.loads((run / "report.json").read_text())
    assert report["extracted"]["recovery"]["steps"] == 3 and report["extraction"]["recovery_steps"] == 3
    assert json.loads((run / "extracted" / "bayesprune_extraction.json").read_text())["recovery"]["tokens"] == 3 * 4 * 32


def test_the_default_recovery_grows_with_the_share_cut_and_a_given_one_is_kept():
    by_cut = ExtractionConfig("0.5")
    assert by_cut.recovery_steps is None and by_cut.in_memory
    assert [recovery_steps(by_cut, kept) for kept in (0.9, 0.75, 0.5, 0.25, 0.0)] == [50, 50, 100, 150, 200]
    assert [recovery_steps(ExtractionConfig("0.5", recovery_steps=n), 0.25) for n in (0, 7)] == [0, 7]
    assert not ExtractionConfig("0.5", recovery_steps=0).in_memory
    assert ExtractionConfig.from_dict({"target": "0.5", "recovery_steps": None}).recovery_steps is None

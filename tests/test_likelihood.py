import copy

import pytest
import torch

from bayesprune import FitConfig, GateConfig, fit, gate
from bayesprune.core.likelihood import NLL_ROWS, sequence_nll, token_nll
from bayesprune.core.likelihood import (DistillationLikelihood, NetworkTeacher, NextTokenLikelihood, OpenGatesTeacher,
                                   likelihood_for)
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
KINDS = ("block", "attn", "mlp", "head", "neuron")


def soft_gates(gated, value: float = 0.7) -> dict:
    return {k: torch.full(gated.values.shape(k), value, requires_grad=True) for k in gated.kinds}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_next_token_nll_and_its_gradient_are_cross_entropys(dtype):
    generator = torch.Generator().manual_seed(0)
    vocabulary, positions = 300, 2 * NLL_ROWS + 7  # chunks of every length
    logits = (3 * torch.randn(3, positions, vocabulary, generator=generator)).to(dtype)
    ids = torch.randint(0, vocabulary, (3, positions), generator=generator)
    weights = torch.randn(3, positions - 1, generator=generator)
    exact = logits.double().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy(exact[:, :-1].reshape(-1, vocabulary), ids[:, 1:].reshape(-1),
                                                  reduction="none").view(3, -1)
    (reference * weights).sum().backward()
    scored = logits.clone().requires_grad_(True)
    nll = token_nll(scored, ids)
    (nll * weights).sum().backward()
    assert nll.dtype == torch.float32 and scored.grad.dtype == dtype
    torch.testing.assert_close(nll.double(), reference.detach(), rtol=1e-6, atol=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2  # the gradient is rounded to the logits' dtype
    torch.testing.assert_close(scored.grad.double(), exact.grad, rtol=tolerance, atol=tolerance)
    assert not scored.grad[:, -1].any()  # the last position predicts nothing
    # A slice of the positions (what scoring a continuation after its prompt passes) scores the same tokens.
    torch.testing.assert_close(token_nll(logits[:, 5:], ids[:, 5:]), nll.detach()[:, 5:])


def test_distillation_is_zero_at_the_dense_network_and_grows_as_gates_close():
    gated = gate(tiny_model("llama"), GateConfig(units=KINDS))
    distill = likelihood_for(gated, "distillation")
    value, nll = distill(gated, SEQUENCES)
    torch.testing.assert_close(value, torch.zeros(len(SEQUENCES)), atol=1e-4, rtol=0)
    torch.testing.assert_close(nll, sequence_nll(gated, SEQUENCES))
    with gated.gates_set({"block": torch.tensor([1.0, 0.0, 1.0, 1.0])}):
        closed, _ = distill(gated, SEQUENCES)
        assert (closed > 0.1).all()
        # With all the weight on the NLL it is the NLL, whatever the teacher.
        mixed, _ = DistillationLikelihood(OpenGatesTeacher(gated), nll_weight=1.0)(gated, SEQUENCES)
        torch.testing.assert_close(mixed, sequence_nll(gated, SEQUENCES))
        plain, _ = NextTokenLikelihood()(gated, SEQUENCES)
        torch.testing.assert_close(plain, mixed)


def test_every_gate_kind_moves_the_distillation_loss():
    gated = gate(tiny_model("llama"), GateConfig(units=KINDS))
    distill = likelihood_for(gated, "distillation")
    gates = soft_gates(gated)
    with gated.gates_set(gates):
        distill(gated, SEQUENCES)[0].sum().backward()
    for kind, g in gates.items():
        assert g.grad is not None and g.grad.abs().sum() > 0, kind


def test_a_trained_weights_teacher_is_the_network_before_training():
    gated = gate(tiny_model("llama"), GateConfig(units=("neuron",)))
    with torch.no_grad():
        before = gated(input_ids=SEQUENCES).logits
    teacher = NetworkTeacher.frozen_copy(gated)
    with torch.no_grad():
        for p in gated.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(teacher(SEQUENCES), before)
        assert not torch.allclose(gated(input_ids=SEQUENCES).logits, before)
    assert not any(p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize("weights", ["frozen", "joint"])
def test_a_distillation_fit_runs_records_both_scores_and_keeps_frozen_weights(weights):
    model = tiny_model("llama")
    original = copy.deepcopy(model.state_dict())
    gated = gate(model, GateConfig(units=("head", "neuron")))
    config = FitConfig(steps=4, batch_size=4, seq_len=12, weights=weights, likelihood="distillation",
                       nll_weight=0.25)
    result = fit(gated, SEQUENCES, config, progress=False)
    assert all({"nll", "likelihood"} <= set(r) for r in result.history)
    assert all(0 <= r["likelihood"] < r["nll"] for r in result.history)
    changed = any(not torch.equal(v, original[k]) for k, v in gated.remove().state_dict().items())
    assert changed == (weights == "joint")
    assert result.posterior().inclusion_mean(1.0)["neuron"].shape == (4, 48)


def test_bad_likelihood_settings_are_refused():
    with pytest.raises(ValueError, match="likelihood must be"):
        FitConfig(likelihood="kl")
    with pytest.raises(ValueError, match="nll_weight"):
        FitConfig(likelihood="distillation", nll_weight=1.5)


def test_the_command_line_fits_with_distillation(tiny_model_dir, corpus_dir, tmp_path, capsys):
    from bayesprune.run.cli import main
    from bayesprune.run.rundir import read_config
    from tests.test_cli import FIT_ARGS

    run = tmp_path / "run"
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run),
                 "--units", "neuron", "--likelihood", "distillation", "--nll-weight", "0.5", "--target", "0.5",
                 *FIT_ARGS]) == 0
    capsys.readouterr()
    config = read_config(run)
    assert (config.fit.likelihood, config.fit.nll_weight) == ("distillation", 0.5)
    assert (run / "extracted" / "config.json").is_file()
    assert main(["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(tmp_path / "bad"),
                 "--likelihood", "distillation", "--nll-weight", "2", *FIT_ARGS]) == 2
    assert "nll_weight" in capsys.readouterr().err and not (tmp_path / "bad").exists()

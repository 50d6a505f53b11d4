import pytest
import torch

from bayesprune import FitConfig, GateConfig, gate
from bayesprune.amortised import CostConditionedGates, cost_position, draw_cost, unit_importance
from bayesprune.amortised_fit import fit_amortised
from bayesprune.config import AmortisedConfig
from bayesprune.model import NonFiniteLossError
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))
UNITS = ("block", "attn", "mlp", "head", "neuron")


def scrambled(gates: CostConditionedGates) -> CostConditionedGates:
    """Every guide parameter set far from its initial value."""
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 2)
    return gates


@pytest.mark.parametrize("family", ["llama", "olmo2", "gpt2"])
def test_at_cost_zero_the_model_is_exactly_the_dense_one_whatever_the_parameters(family):
    model = tiny_model(family)
    ids = SEQUENCES[:2]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    units = tuple(u for u in UNITS if not (family == "gpt2" and u == "head"))
    gated = gate(model, GateConfig(units=units))
    gates = scrambled(CostConditionedGates.for_model(gated, AmortisedConfig(offset_scale=1.0)))
    assert set(gates.offsets) == set(units)
    draws, amplitudes, probabilities = gates.sample(0.0)
    assert all(torch.equal(p, torch.ones_like(p)) for p in probabilities.values())
    assert all(torch.equal(a, torch.ones_like(a)) for a in amplitudes.values())
    with torch.no_grad(), gated.gates_set(draws, amplitudes):
        assert torch.equal(gated(input_ids=ids).logits, reference)


def test_thresholds_rise_with_the_cost_and_importance_is_relative_to_the_layer():
    gated = gate(tiny_model("llama"), GateConfig(units=UNITS))
    gates = scrambled(CostConditionedGates.for_model(gated))
    for kind in UNITS:
        values = torch.stack([gates.threshold(kind, c) for c in (0.0, 0.1, 0.5, 1, 3, 10, 100)])
        assert (values.diff(dim=0) >= -1e-5).all()
        assert torch.allclose(values[0], torch.full_like(values[0], AmortisedConfig().threshold_start))
    for kind in ("head", "neuron"):
        assert torch.allclose(gates.importance(kind).mean(-1), torch.ones(4))


def test_layer_curves_are_shrunk_toward_the_shared_curve():
    gated = gate(tiny_model("llama"), GateConfig(units=("neuron",)))
    gates = CostConditionedGates.for_model(gated)
    at_zero = gates.curve_log_prior()
    with torch.no_grad():
        gates.deviations["neuron"][1] += 0.5
    apart = gates.curve_log_prior()
    with torch.no_grad():
        gates.deviations["neuron"][1] += 0.5
    assert at_zero > apart > gates.curve_log_prior()


def test_unit_offsets_rerank_units_under_their_prior_and_survive_a_round_trip(tmp_path):
    from bayesprune.cost_curve import CostCurve

    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    assert len(CostConditionedGates.for_model(gated, AmortisedConfig(offset_scale=0)).offsets) == 0
    config = AmortisedConfig(offset_scale=0.5, lr=0.1)
    fit = fit_amortised(gated, SEQUENCES, FitConfig(steps=10, batch_size=4), config, progress=False)
    gates = fit.gates
    assert all(offsets.abs().max() > 0 for offsets in gates.offsets.values())
    without = gates.importance("neuron") * gates.amplitude("neuron", 1.0) - gates.threshold("neuron", 1.0)[:, None]
    expected = (without + gates.offsets["neuron"]) / config.temperature
    assert torch.allclose(gates.logits("neuron", 1.0), expected)
    prior = gates.curve_log_prior()
    with torch.no_grad():
        gates.offsets["head"].add_(1.0)
    assert gates.curve_log_prior() < prior
    curve = CostCurve.from_fit(fit)
    curve.save(tmp_path / "curve.safetensors")
    loaded = CostCurve.load(tmp_path / "curve.safetensors")
    assert loaded.gates.config.offset_scale == 0.5
    assert torch.equal(loaded.probabilities(1.0)["head"], curve.probabilities(1.0)["head"])


def test_cost_draws_follow_the_configured_mixture():
    torch.manual_seed(0)
    config = AmortisedConfig(zero_probability=0.25, rate=2.0)
    draws = torch.tensor([draw_cost(config) for _ in range(4000)])
    assert (draws == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert draws[draws > 0].mean().item() == pytest.approx(0.5, abs=0.05)
    assert cost_position(1.0) == 0.5
    with pytest.raises(ValueError, match="cost"):
        cost_position(-1.0)


def test_a_fit_learns_to_keep_less_at_higher_cost():
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    fit = fit_amortised(gated, SEQUENCES, FitConfig(steps=40, batch_size=4),
                        AmortisedConfig(lr=0.1, zero_probability=0.0, rate=0.5), progress=False)
    from bayesprune.model import kept_fraction

    def kept(cost):
        with torch.no_grad():
            return kept_fraction({k: p.double() for k, p in fit.gates.probabilities(cost).items()}, fit.sizes).item()

    assert kept(0.0) == 1.0
    assert kept(0.05) > kept(1.0) > kept(20.0)
    assert len(fit.history) == 40 and {"cost", "nll", "expected_kept"} <= set(fit.history[0])


def test_importance_follows_trained_weights_with_its_gradient_and_stays_put_when_frozen():
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    tracked = unit_importance(gated, track=True)
    tracked["neuron"][0, 0].backward()
    down = gated.model.model.layers[0].mlp.down_proj
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0
    before = {k: v.clone() for k, v in unit_importance(gated).items()}
    frozen = fit_amortised(gated, SEQUENCES, FitConfig(steps=3, batch_size=4), progress=False)
    assert all(torch.equal(frozen.gates.importance(k), before[k]) for k in before)
    joint = fit_amortised(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, weights="joint", weight_lr=0.05),
                          progress=False)
    after = unit_importance(gated)
    for kind in before:
        assert torch.equal(joint.gates.importance(kind), after[kind])
        assert not joint.gates.importance(kind).requires_grad
        assert not torch.allclose(after[kind], before[kind])


@pytest.mark.parametrize("weights", ["frozen", "joint"])
def test_an_interrupted_fit_resumes_exactly(tmp_path, weights):
    def run(steps, directory):
        gated = gate(tiny_model("llama"), GateConfig(units=("neuron",)))
        config = FitConfig(steps=steps, batch_size=2, checkpoint_every=3, weights=weights)
        return fit_amortised(gated, SEQUENCES, config, run_dir=directory, progress=False)

    whole = run(6, tmp_path / "whole")
    run(3, tmp_path / "parts")
    resumed = run(6, tmp_path / "parts")
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history], rel=1e-5)
    for name, value in whole.gates.state_dict().items():
        assert torch.allclose(value, resumed.gates.state_dict()[name], atol=1e-6), name


def test_a_non_finite_loss_is_refused():
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    gated = gate(model, GateConfig(units=("neuron",)))
    with pytest.raises(NonFiniteLossError):
        fit_amortised(gated, SEQUENCES, FitConfig(steps=2, batch_size=2), progress=False)

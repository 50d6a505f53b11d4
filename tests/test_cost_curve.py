import copy

import pytest
import torch

from bayesprune import FitConfig, GateConfig, ModelTotals, TargetError, gate
from bayesprune.amortised_fit import fit_amortised
from bayesprune.config import AmortisedConfig
from bayesprune.cost_curve import CostCurve, cost_grid
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted_model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def fitted(fitted_model):
    model = fitted_model
    gated = gate(model, GateConfig(units=("attn", "head", "neuron")))
    fit = fit_amortised(gated, SEQUENCES, FitConfig(steps=30, batch_size=4),
                        AmortisedConfig(lr=0.1, zero_probability=0.0, rate=0.5), progress=False)
    curve = CostCurve.from_fit(fit)
    gated.remove()
    return curve, ModelTotals.of(model)


def test_expected_size_starts_at_the_dense_model_and_falls_with_the_cost(fitted):
    curve, totals = fitted
    rows = curve.size_curve(cost_grid(9, 50.0), totals, num_draws=100)
    assert rows[0]["cost"] == 0 and rows[0]["fraction"] == 1.0 and rows[0]["fraction_sd"] == 0.0
    assert rows[-1]["fraction"] < rows[1]["fraction"]
    assert all(r["fraction_5%"] <= r["fraction"] + 0.05 and r["fraction"] <= r["fraction_95%"] + 0.05 for r in rows)
    assert rows[0]["megabytes"] == pytest.approx(rows[0]["parameters"] * totals.bytes_per_parameter / 1e6)


def test_draws_at_a_cost_average_to_the_exact_expectation(fitted):
    curve, _ = fitted
    draws = curve.fraction_draws(1.0, num_draws=4000)
    assert draws.mean().item() == pytest.approx(curve.expected_fraction(1.0), abs=0.01)


def test_the_solver_finds_the_cost_of_a_target_and_the_plan_fills_it(fitted):
    curve, totals = fitted
    low = curve.expected_fraction(1e6)
    target = (1 + low) / 2
    cost = curve.solve(target, totals)
    assert curve.expected_fraction(cost) == pytest.approx(target, abs=0.01)
    plan = curve.plan(target, totals)
    assert plan.cost == cost and plan.record()["cost"] == cost
    assert target - 0.06 <= plan.fraction <= target
    with pytest.raises(TargetError, match="block count"):
        curve.solve("2layers", totals)


def test_a_target_below_what_any_cost_keeps_is_still_filled_by_rank(fitted):
    curve, totals = fitted
    plan = curve.plan("0.05", totals)
    assert plan.cost > 1e5 and plan.fraction <= 0.05


def test_save_and_load_give_the_same_curve(fitted, tmp_path):
    curve, _ = fitted
    curve.save(tmp_path / "curve.safetensors")
    loaded = CostCurve.load(tmp_path / "curve.safetensors")
    for cost in (0.0, 0.3, 4.0):
        a, b = curve.probabilities(cost), loaded.probabilities(cost)
        assert all(torch.allclose(a[k], b[k]) for k in a)
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError):
        CostCurve.load(tmp_path / "bad.safetensors")


def test_the_extracted_model_at_a_target_is_the_hard_gated_model_at_the_solved_cost(fitted, fitted_model):
    from bayesprune import extract_model

    curve, totals = fitted
    curve = copy.deepcopy(curve)
    with torch.no_grad():
        for p in curve.gates.log_amplitudes.values():  # make the amplitudes matter
            p.normal_(0, 0.5)
    plan = curve.plan("0.7", totals)
    cost = plan.cost
    gated = gate(fitted_model, GateConfig(units=curve.gates.kinds))
    hard = plan.gates(gated.kinds, gated.widths.heads, gated.widths.neurons)
    ids = SEQUENCES[:2]
    with torch.no_grad(), gated.gates_set(hard, curve.amplitudes(cost)):
        expected = gated(input_ids=ids).logits
    gated.remove()
    with torch.no_grad():
        assert torch.allclose(extract_model(fitted_model, plan)(input_ids=ids).logits, expected, atol=1e-4)

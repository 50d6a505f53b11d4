import copy
import dataclasses

import arviz as az
import numpy as np
import pytest
import torch

from bayesprune import CostConfig, FitConfig, GateConfig, GatePosterior, ModelTotals, fit, gate
from bayesprune.core.posterior import cost_grid
from bayesprune.core.targets import TargetError
from tests.conftest import VOCAB, posterior_for, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fitted_model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def fitted(fitted_model):
    gated = gate(fitted_model, GateConfig(units=("attn", "head", "neuron")))
    result = fit(gated, SEQUENCES, FitConfig(steps=30, batch_size=4, guide_lr=0.1),
                 cost=CostConfig(zero_probability=0.0, rate=0.5), progress=False)
    posterior = result.posterior(200)
    gated.remove()
    return posterior, ModelTotals.of(fitted_model)


def test_draws_follow_the_guide_and_repeat(fitted):
    posterior, _ = fitted
    theta = posterior.theta()
    assert theta["neuron_offset"].shape == (200, 4, 48) and theta["attn_local_scale"].shape == (200, 4)
    assert (theta["head_global_scale"] > 0).all()
    assert torch.equal(theta["neuron_offset"], dataclasses.replace(posterior).theta()["neuron_offset"])
    loc, scale = posterior.locs["neuron_offset"], posterior.scales["neuron_offset"]
    assert torch.allclose(theta["neuron_offset"].mean(0), loc, atol=4 * scale.max().item() / 200 ** 0.5)
    assert torch.allclose(theta["head_global_scale"].log().std(), posterior.scales["head_global_scale"], rtol=0.2)


def test_every_inclusion_probability_has_an_interval_at_every_cost(fitted):
    posterior, _ = fitted
    for cost in (0.3, 2.0):
        p = posterior.inclusion(cost)
        assert p["neuron"].shape == (200, 4, 48) and p["attn"].shape == (200, 4)
        spread = p["neuron"].std(0)
        assert (spread > 0).all(), "a posterior over θ, not point estimates"
        assert torch.allclose(posterior.inclusion_mean(cost)["neuron"], p["neuron"].double().mean(0))
    assert all(torch.equal(v, torch.ones_like(v)) for v in posterior.inclusion(0.0).values())
    with pytest.raises(ValueError, match="say which one"):
        posterior.inclusion()


def test_expected_size_starts_at_the_dense_model_and_falls_with_the_cost(fitted):
    posterior, totals = fitted
    rows = posterior.size_curve(cost_grid(9, 50.0), totals)
    assert rows[0]["cost"] == 0 and rows[0]["fraction"] == 1.0 and rows[0]["fraction_sd"] == 0.0
    assert rows[-1]["fraction"] < rows[1]["fraction"]
    assert all(r["fraction_5%"] <= r["fraction"] + 0.05 and r["fraction"] <= r["fraction_95%"] + 0.05 for r in rows)
    decoder = posterior.sizes.decoder_parameters
    assert rows[0]["parameters"] == pytest.approx(decoder + totals.outside_parameters)
    assert rows[0]["megabytes"] == pytest.approx(rows[0]["parameters"] * totals.bytes_per_parameter / 1e6)


def test_hard_draws_average_to_the_expected_fraction(fitted):
    posterior, _ = fitted
    draws = torch.cat([posterior.fraction_draws(1.0, seed=s) for s in range(20)])
    assert draws.mean().item() == pytest.approx(posterior.expected_fraction(1.0), abs=0.01)


def test_the_solver_finds_the_cost_of_a_target_and_the_plan_fills_it(fitted):
    posterior, totals = fitted
    target = (1 + posterior.expected_fraction(1e6, point=True)) / 2
    cost = posterior.solve(target, totals)
    assert posterior.expected_fraction(cost, point=True) == pytest.approx(target, abs=0.01)
    plan = posterior.plan(target, totals)
    assert plan.cost == cost and plan.record()["cost"] == cost
    assert target - 0.06 <= plan.fraction <= target
    assert len(posterior.plan("2layers", totals).layers) == 2  # a run with branch gates takes a block count
    width_only = dataclasses.replace(posterior, kinds=("head", "neuron"))
    with pytest.raises(TargetError, match="block count"):
        width_only.solve("2layers", totals)


def test_parameter_and_byte_targets_give_the_same_sub_network_as_the_equal_fraction(fitted):
    posterior, totals = fitted
    fraction = 0.6
    decoder = posterior.sizes.decoder_parameters
    parameters = fraction * decoder + totals.outside_parameters
    by_fraction = posterior.plan(fraction, totals)
    by_parameters = posterior.plan(f"{parameters:.0f}", totals)
    by_bytes = posterior.plan(f"{parameters * totals.bytes_per_parameter / 1e6:.6f}MB", totals)
    assert by_parameters.cost == pytest.approx(by_fraction.cost, rel=1e-3)
    assert by_bytes.cost == pytest.approx(by_fraction.cost, rel=1e-3)
    assert by_parameters.record()["layers"] == by_fraction.record()["layers"] == by_bytes.record()["layers"]


def test_a_flop_target_counts_attention_and_is_met(fitted):
    posterior, totals = fitted
    plan = posterior.plan("50%flops", totals)
    assert 0.4 < plan.flop_fraction <= 0.5
    assert posterior.expected_fraction(plan.cost, posterior.sizes.flops(), point=True) == pytest.approx(0.5, abs=0.02)


def test_targets_larger_than_the_model_are_refused(fitted):
    posterior, totals = fitted
    for target in ("1GB", "1B"):
        with pytest.raises(TargetError, match="more than the whole model"):
            posterior.plan(target, totals)


def test_a_target_below_what_any_cost_keeps_is_still_filled_by_rank(fitted):
    posterior, totals = fitted
    smallest = posterior.expected_fraction(1e6, point=True)
    plan = posterior.plan(smallest * 0.8, totals)
    assert plan.cost > 1e5 and plan.fraction <= smallest * 0.8


def test_inference_data_is_over_cost_with_real_names(fitted):
    posterior, _ = fitted
    costs = [0.0, 0.5, 2.0]
    idata = posterior.to_inference_data(costs, num_draws=50)
    assert set(idata.groups()) == {"posterior"}
    post = idata.posterior
    assert post["neuron_inclusion"].dims == ("chain", "draw", "cost", "layer", "neuron")
    assert post["neuron_inclusion"].shape == (1, 50, 3, 4, 48)
    assert post["attn_inclusion"].dims == post["head_kept_fraction"].dims == ("chain", "draw", "cost", "layer")
    assert post["attn_threshold"].dims == ("chain", "draw", "cost", "layer")
    assert post["kept_fraction"].dims == ("chain", "draw", "cost")
    assert list(post["cost"].values) == costs
    assert list(post["layer"].values) == [f"model.layers.{i}" for i in range(4)]
    assert float(post["kept_fraction"].sel(cost=0.0).min()) == 1.0
    assert float(post["kept_fraction"].sel(cost=2.0).mean()) < float(post["kept_fraction"].sel(cost=0.5).mean())
    table = az.summary(idata, var_names=["attn_inclusion"], kind="stats")
    assert "attn_inclusion[0.5, model.layers.3]" in table.index
    az.plot_forest(idata, var_names=["head_kept_fraction"], coords={"cost": 0.5}, combined=True)
    az.plot_hdi(costs, post["kept_fraction"].values)


def test_figures_are_written(fitted, tmp_path):
    from bayesprune.run.plots import plot_inclusion_over_cost, plot_thresholds, plot_width

    posterior, _ = fitted
    plot_width(posterior, 1.0, tmp_path / "width.png")
    plot_thresholds(posterior, tmp_path / "thresholds.png")
    plot_inclusion_over_cost(posterior.to_inference_data(num_draws=20), tmp_path / "inclusion.png")
    for name in ("width.png", "thresholds.png", "inclusion.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name


def test_width_summary_brackets_its_means(fitted):
    posterior, _ = fitted
    rows = posterior.width_summary(1.0)
    assert len(rows) == 2 * 4 and {r["kind"] for r in rows} == {"head", "neuron"}
    assert all(r["hdi_3%"] <= r["kept_fraction"] <= r["hdi_97%"] for r in rows)


def test_the_extracted_model_at_a_target_is_the_hard_gated_model_at_the_solved_cost(fitted, fitted_model):
    from bayesprune import extract_model

    posterior, totals = fitted
    posterior = copy.deepcopy(posterior)
    for kind in ("head", "neuron"):  # make the amplitudes matter
        posterior.locs[f"{kind}_log_amplitude"].normal_(0, 0.5)
    posterior._theta.clear()
    plan = posterior.plan("0.7", totals)
    gated = gate(fitted_model, GateConfig(units=posterior.kinds))
    hard = plan.gates(gated.kinds, gated.values.units)
    ids = SEQUENCES[:2]
    with torch.no_grad(), gated.gates_set(hard, posterior.amplitudes(plan.cost, point=True)):
        expected = gated(input_ids=ids).logits
    gated.remove()
    with torch.no_grad():
        assert torch.allclose(extract_model(fitted_model, plan)(input_ids=ids).logits, expected, atol=1e-4)


@pytest.fixture(scope="module")
def blocks():
    return posterior_for(tiny_model("llama"), {"block": torch.tensor([3.0, -3.0, 1.0, 0.0]),
                                               "attn": torch.tensor([4.0, 4.0, -4.0, 4.0])})


def test_removal_probabilities_are_consistent(blocks):
    p = blocks.removal_probability()
    assert p.shape == (4, 5)
    assert torch.all(p[:, 0] == 0) and torch.all(p[:, -1] == 1)
    assert torch.all(p[:, 1:] >= p[:, :-1]), "more removed ⇒ at least as likely to be among them"
    assert torch.allclose(p.sum(0), torch.arange(5, dtype=torch.float32)), "k blocks are removed for each k"


def test_keep_probability_nests_branches_under_blocks():
    posterior = posterior_for(tiny_model("llama"), {"block": torch.tensor([10.0, 10.0, 10.0, 10.0]),
                                                     "attn": torch.tensor([-10.0, 10.0, 10.0, 10.0]),
                                                     "mlp": torch.tensor([-10.0, -10.0, 10.0, 10.0])})
    p = posterior.block_keep_probability().mean(0)
    assert p[0].item() == pytest.approx(0.0, abs=1e-3), "both branches off: the block is gone"
    assert p[1].item() == pytest.approx(1.0, abs=1e-3)


def test_summary_ranks_by_inclusion(blocks):
    rows = blocks.summary()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert [r["layer"] for r in rows] == [f"model.layers.{i}" for i in (0, 2, 3, 1)]
    assert all(r["hdi_3%"] <= r["inclusion"] <= r["hdi_97%"] for r in rows)


def test_save_and_load_round_trip(fitted, tmp_path):
    posterior, _ = fitted
    posterior.save(tmp_path / "p.safetensors")
    loaded = GatePosterior.load(tmp_path / "p.safetensors")
    assert loaded.kinds == posterior.kinds and loaded.layer_names == posterior.layer_names
    assert loaded.num_draws == posterior.num_draws and loaded.units == posterior.units
    assert loaded.prior == posterior.prior and loaded.fixed_cost is None
    for cost in (0.0, 0.3, 4.0):
        a, b = posterior.inclusion(cost), loaded.inclusion(cost)
        assert all(torch.equal(a[k], b[k]) for k in a)
    np.testing.assert_array_equal(loaded.removal_probability(1.0), posterior.removal_probability(1.0))


def test_foreign_corrupt_and_non_finite_files_are_refused(fitted, tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="not written by bayesprune"):
        GatePosterior.load(tmp_path / "foreign.safetensors")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        GatePosterior.load(tmp_path / "corrupt.safetensors")
    broken = copy.deepcopy(fitted[0])
    broken.locs["neuron_offset"][0, 0] = float("nan")
    broken.save(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="non-finite"):
        GatePosterior.load(tmp_path / "nan.safetensors")

import math

import pyro
import pytest
import torch
from pyro import poutine

from bayesprune import CostConfig, GateConfig, PriorConfig, gate
from bayesprune.core import inclusion
from bayesprune.core.fit import cost_quantile, draw_cost, step_costs
from bayesprune.core.guide import CostConditionedGuide
from bayesprune.core.model import PruningModel, ShrinkagePrior
from bayesprune.core.sizes import UnitSizes
from tests.conftest import TINY_CONFIGS, VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (10, 8), generator=torch.Generator().manual_seed(0))
UNITS = ("block", "attn", "mlp", "head", "neuron")


def sizes(**values) -> UnitSizes:
    base = dict(other=1.0, attn=0.0, mlp=0.0, head=0.0, neuron=0.0, heads=2.0, neurons=2.0, head_features=1.0)
    base |= values
    return UnitSizes.from_tensors({f"sizes.{k}": torch.full((2,), float(v), dtype=torch.float64) for k, v in base.items()})


def test_kept_fraction_counts_nesting():
    s = sizes(attn=2, mlp=6)
    assert s.kept_fraction({}).item() == 1.0 and s.decoder_parameters == 18
    # Block 1 off removes all 9 of its parameters, whatever its branches say.
    z = {"block": torch.tensor([1.0, 0.0]), "attn": torch.tensor([0.0, 1.0]), "mlp": torch.tensor([1.0, 1.0])}
    assert s.kept_fraction(z).item() == pytest.approx((6 + 1) / 18)
    draws = {"block": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    assert s.kept_fraction(draws).tolist() == [1.0, 0.5]


def test_width_units_count_only_under_open_ancestors():
    # Per layer: 1 norm, attn = 1 fixed + 2 heads × 3, mlp = 0 fixed + 4 neurons × 2 → 16.
    s = sizes(attn=1, head=3, neuron=2, neurons=4)
    assert s.kept_parameters({}).item() == 32
    z = {"block": torch.tensor([1.0, 0.0]), "mlp": torch.tensor([1.0, 1.0]),
         "head": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "neuron": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)}
    assert s.kept_parameters(z).item() == 1 + (1 + 3) + 2 * 2
    z["mlp"] = torch.tensor([0.0, 1.0])
    assert s.kept_parameters(z).item() == 1 + (1 + 3)


def test_flops_count_two_per_weight_and_attention_over_the_context():
    s = sizes(attn=1, head=3, neuron=2, head_features=8)
    flops = s.flops(context=10)
    assert flops.unit["neuron"][0] == 4 and flops.other[0] == 2
    assert flops.unit["head"][0] == 2 * 3 + 4 * 10 * 8
    assert flops.decoder_parameters > 2 * s.decoder_parameters


def trace(units=UNITS, cost=0.7, family="llama", **prior):
    pyro.clear_param_store()
    gated = gate(tiny_model(family), GateConfig(units=units))
    model = PruningModel(gated, SEQUENCES, PriorConfig(**prior))
    guide = CostConditionedGuide(model.prior)
    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(torch.tensor([0, 3]), cost)
    return gated, model, guide_trace, model_trace


def test_one_vectorised_site_per_parameter_and_kind_with_its_levels():
    _, model, guide_trace, model_trace = trace()
    for kind in UNITS:
        unit = (4, 48) if kind == "neuron" else (4, 2) if kind == "head" else (4,)
        assert model_trace.nodes[f"{kind}_threshold_curve"]["value"].shape == (9,)      # global level
        assert model_trace.nodes[f"{kind}_global_scale"]["value"].shape == ()
        assert model_trace.nodes[f"{kind}_local_scale"]["value"].shape == (4,)          # layer level
        assert model_trace.nodes[f"{kind}_deviation"]["value"].shape == (4, 9)
        assert model_trace.nodes[f"{kind}_offset"]["value"].shape == unit               # unit level
        assert (f"{kind}_log_amplitude" in model_trace.nodes) == (kind != "block")
        gates = model_trace.nodes[f"{kind}_gate"]["value"]
        assert gates.shape == unit and set(gates.unique().tolist()) <= {0.0, 1.0}
    latent = {n for n, s in model_trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not n.endswith("sequences")}
    assert latent == {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}


def test_the_cost_factor_is_the_expected_kept_size_and_the_likelihood_is_scaled_to_the_corpus():
    _, model, guide_trace, model_trace = trace(cost=0.7)
    theta = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    p = inclusion.probabilities(theta, model.importance, 0.7, model.prior.config)
    factor = model_trace.nodes["cost"]["fn"].log_factor
    assert model.num_tokens == 10 * 7
    assert factor.item() == pytest.approx(-0.7 * 70 * model.sizes.kept_fraction(p).item(), rel=1e-5)
    likelihood = model_trace.nodes["likelihood"]
    assert likelihood["scale"] == pytest.approx(10 / 2), "the mini-batch is scaled to the corpus"
    assert likelihood["fn"].log_factor.shape == (2,)


def scrambled(prior: ShrinkagePrior) -> dict[str, torch.Tensor]:
    """Every parameter far from where the guide starts."""
    generator = torch.Generator().manual_seed(3)
    return {s.name: (torch.randn(s.shape, generator=generator) * 2).exp() if s.positive else
            torch.randn(s.shape, generator=generator) * 2 for s in prior.sites()}


@pytest.mark.parametrize("family", ["llama", "olmo2", "gpt2"])
def test_at_cost_zero_the_model_is_exactly_the_dense_one_whatever_the_parameters(family):
    model = tiny_model(family)
    ids = SEQUENCES[:2]
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    units = tuple(u for u in UNITS if not (family == "gpt2" and u == "head"))
    gated = gate(model, GateConfig(units=units))
    pruning = PruningModel(gated, SEQUENCES, PriorConfig(offset_scale=1.0))
    theta = scrambled(pruning.prior)
    p = inclusion.probabilities(theta, pruning.importance, 0.0, pruning.prior.config)
    amplitudes = inclusion.amplitudes(theta, pruning.importance, 0.0)
    assert all(torch.equal(v, torch.ones_like(v)) for v in p.values())
    assert set(amplitudes) == set(units) - {"block"}
    assert all(torch.equal(a, torch.ones_like(a)) for a in amplitudes.values())
    with torch.no_grad(), gated.gates_set(p, amplitudes):
        assert torch.equal(gated(input_ids=ids).logits, reference)


def test_thresholds_rise_with_the_cost_and_importance_is_relative_to_the_layer():
    gated = gate(tiny_model("llama"), GateConfig(units=UNITS))
    pruning = PruningModel(gated, SEQUENCES, PriorConfig())
    theta = scrambled(pruning.prior)
    for kind in UNITS:
        values = torch.stack([inclusion.thresholds(theta, kind, c, pruning.prior.config)
                              for c in (0.0, 0.1, 0.5, 1, 3, 10, 100)])
        assert (values.diff(dim=0) >= -1e-5).all()
        assert torch.allclose(values[0], torch.full_like(values[0], PriorConfig().threshold_start))
    for kind in ("head", "neuron"):
        assert torch.allclose(pruning.importance[kind].mean(-1), torch.ones(4))


def test_logits_add_offsets_to_amplified_importance_and_subtract_the_layer_threshold():
    gated = gate(tiny_model("llama"), GateConfig(units=("neuron",)))
    pruning = PruningModel(gated, SEQUENCES, PriorConfig())
    theta, c = scrambled(pruning.prior), pruning.prior.config
    importance = pruning.importance["neuron"]
    amplitude = inclusion.amplitude(theta, "neuron", 1.0, 2)
    expected = (importance * amplitude + theta["neuron_offset"] -
                inclusion.thresholds(theta, "neuron", 1.0, c)[:, None]) / c.temperature
    assert torch.allclose(inclusion.logits(theta, "neuron", importance, 1.0, c), expected)
    none = ShrinkagePrior(PriorConfig(offset_scale=0), ("neuron",), 4, {"neuron": 48})
    assert "neuron_offset" not in {s.name for s in none.sites()}


def test_layer_deviations_are_shrunk_toward_the_shared_curve_by_a_horseshoe():
    prior = ShrinkagePrior(PriorConfig(), ("neuron",), 4, {"neuron": 48})
    site = next(s for s in prior.sites() if s.name == "neuron_deviation")
    theta = {"neuron_global_scale": torch.tensor(0.1), "neuron_local_scale": torch.tensor([1.0, 1.0, 1.0, 10.0])}
    density = prior.distribution(site, theta)
    apart = torch.zeros(4, 9)
    apart[0] = 0.5
    escaped = torch.zeros(4, 9)
    escaped[3] = 0.5
    assert density.log_prob(torch.zeros(4, 9)) > density.log_prob(escaped) > density.log_prob(apart), \
        "a layer with a large local scale may stand out; the others shrink"


def test_a_prior_is_swapped_in_one_place():
    class WideOffsets(ShrinkagePrior):
        def distribution(self, site, theta):
            if site.name.endswith("_offset"):
                return pyro.distributions.Normal(torch.zeros(site.shape), 5.0).to_event(len(site.shape))
            return super().distribution(site, theta)

    gated = gate(tiny_model("llama"), GateConfig(units=("head",)))
    prior = WideOffsets(PriorConfig(), gated.kinds, gated.num_layers, gated.values.units)
    model = PruningModel(gated, SEQUENCES, prior)
    guide_trace = poutine.trace(CostConditionedGuide(prior)).get_trace()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(torch.tensor([0]), 0.5)
    assert model_trace.nodes["head_offset"]["fn"].base_dist.scale.max() == 5.0


def test_cost_draws_follow_the_configured_mixture_and_a_fixed_cost_is_fixed():
    torch.manual_seed(0)
    config = CostConfig(zero_probability=0.25, rate=2.0)
    draws = torch.tensor([draw_cost(config) for _ in range(4000)])
    assert (draws == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert draws[draws > 0].mean().item() == pytest.approx(0.5, abs=0.05)
    assert {draw_cost(CostConfig(fixed=0.4)) for _ in range(5)} == {0.4}
    assert inclusion.cost_position(1.0) == 0.5
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cost"):
            inclusion.cost_position(bad)
    with pytest.raises(ValueError, match="finite"):
        CostConfig(fixed=float("nan"))


def test_stratified_costs_cover_the_cost_distribution_evenly_in_every_run_of_steps():
    config = CostConfig(zero_probability=0.25, rate=2.0, spacing="stratified")
    costs = torch.tensor([step_costs(config, seed=3, step=s) for s in range(400)]).flatten()
    assert torch.equal(costs, torch.tensor([step_costs(config, 3, s) for s in range(400)]).flatten())  # the step's
    assert not torch.equal(costs, torch.tensor([step_costs(config, 4, s) for s in range(400)]).flatten())
    for start in range(0, 400, 40):  # every 40 consecutive steps: the distribution's levels, evenly
        run = costs[start:start + 40]
        assert (run == 0).sum().item() in (9, 10, 11)
        levels = 0.25 + 0.75 * (1 - torch.exp(-2.0 * run[run > 0])).sort().values   # back to quantile levels
        grid = 0.25 + 0.75 * (torch.arange(len(levels)) + 0.5) / len(levels)
        assert (levels - grid).abs().max() < 0.06
    assert cost_quantile(config, 0.2) == 0.0 and cost_quantile(config, 0.625) == pytest.approx(math.log(2) / 2)
    assert {c for s in range(5) for c in step_costs(CostConfig(fixed=0.4, spacing="stratified"), 0, s)} == {0.4}
    with pytest.raises(ValueError, match="spacing"):
        CostConfig(spacing="sorted")


def test_several_costs_per_step_spread_evenly_over_the_cost_distribution_in_every_step():
    config = CostConfig(zero_probability=0.25, rate=2.0, per_step=4)
    for step in range(20):
        costs = step_costs(config, seed=3, step=step)
        levels = sorted(0.25 + 0.75 * (1 - math.exp(-2.0 * c)) if c > 0 else None for c in costs if c > 0)
        assert len(costs) == 4 and sum(c == 0 for c in costs) == 1  # one part of four at the dense model
        assert all(b - a == pytest.approx(0.25) for a, b in zip(levels, levels[1:]))
    assert step_costs(CostConfig(per_step=4), 3, 7)[0] == step_costs(CostConfig(), 3, 7)[0]  # part 0: one cost's
    torch.manual_seed(0)
    assert len(set(step_costs(CostConfig(zero_probability=0.0, spacing="random", per_step=3), 0, 0))) == 3
    with pytest.raises(ValueError, match="per_step"):
        CostConfig(per_step=0)


def test_importance_follows_trained_weights_with_its_gradient():
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    tracked = inclusion.unit_importance(gated, track=True)
    tracked["neuron"][0, 0].backward()
    down = gated.model.model.layers[0].mlp.down_proj
    assert down.weight.grad is not None and down.weight.grad.abs().sum() > 0
    assert not inclusion.unit_importance(gated)["neuron"].requires_grad


def test_two_point_block_gradients_are_the_exact_on_off_differences():
    """With every block drawn, the surrogate is 0 and its gradient in p_b is −(NLL(b on) − NLL(b off)) per sequence."""
    from bayesprune.core.likelihood import sequence_nll

    gated = gate(tiny_model("llama"), GateConfig(units=("block",)))
    model = PruningModel(gated, SEQUENCES, PriorConfig(), two_point_blocks=gated.num_layers)
    batch = torch.arange(3)
    drawn = torch.tensor([1.0, 0.0, 1.0, 1.0])
    p = torch.full((4,), 0.6, requires_grad=True)
    with torch.no_grad(), gated.gates_set({"block": drawn}):
        nll = sequence_nll(gated, SEQUENCES[batch])
    with gated.gates_set({"block": drawn}):
        surrogate = model._two_point(p, drawn, batch, nll)
    assert torch.equal(surrogate.detach(), torch.zeros(3))
    (grad,) = torch.autograd.grad(surrogate.sum(), p)
    for b in range(4):
        on, off = drawn.clone(), drawn.clone()
        on[b], off[b] = 1.0, 0.0
        with torch.no_grad():
            with gated.gates_set({"block": on}):
                nll_on = sequence_nll(gated, SEQUENCES[batch])
            with gated.gates_set({"block": off}):
                nll_off = sequence_nll(gated, SEQUENCES[batch])
        assert torch.allclose(grad[b], -(nll_on - nll_off).sum(), rtol=1e-5), b


def test_a_two_point_fit_runs_and_moves_the_block_posterior():
    from bayesprune import FitConfig, fit

    gated = gate(tiny_model("llama"), GateConfig(units=("block", "neuron")))
    result = fit(gated, SEQUENCES, FitConfig(steps=4, batch_size=4, seq_len=12, two_point_blocks=2), progress=False)
    state = result.guide.state_dict()  # block deviations start at 0
    assert any(k.startswith("block_deviation_loc") and v.abs().max() > 0 for k, v in state.items())


def test_removal_importance_is_each_blocks_own_nll_rise_and_reaches_the_posterior():
    from bayesprune import FitConfig, fit
    from bayesprune.core.likelihood import sequence_nll

    gated = gate(tiny_model("llama"), GateConfig(units=("block", "neuron")))
    importance = inclusion.removal_importance(gated, SEQUENCES[:8])
    with torch.no_grad():
        dense = sequence_nll(gated, SEQUENCES[:8]).sum()
        rise = []
        for layer in range(4):
            off = torch.ones(4)
            off[layer] = 0
            with gated.gates_set({"block": off}):
                rise.append((sequence_nll(gated, SEQUENCES[:8]).sum() - dense).item())
    rise = torch.tensor(rise)
    assert torch.allclose(importance, rise / rise.abs().mean(), rtol=1e-4)
    result = fit(gated, SEQUENCES, FitConfig(steps=2, batch_size=4, seq_len=8, weights="frozen",
                                             block_importance="removal"), progress=False)
    pick = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:8]
    assert torch.allclose(result.posterior().importance["block"],
                          inclusion.removal_importance(gated, SEQUENCES[pick]), rtol=1e-5)


def _single_removal_rises(gated, windows) -> dict[str, torch.Tensor]:
    from bayesprune.core.likelihood import calibration_nll

    dense = calibration_nll(gated, windows)
    rises = {}
    for kind in ("head", "neuron"):
        shape = gated.values.shape(kind)
        rise = torch.zeros(shape)
        for layer in range(shape[0]):
            for unit in range(shape[1]):
                off = torch.ones(shape)
                off[layer, unit] = 0
                with gated.gates_set({kind: off}):
                    rise[layer, unit] = calibration_nll(gated, windows) - dense
        rises[kind] = rise
    return rises


def test_critical_units_pass_the_threshold_alone_and_come_from_the_candidates():
    from bayesprune.core.removal import critical_units, input_magnitudes

    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    windows = SEQUENCES[:4]
    rises = _single_removal_rises(gated, windows)
    threshold = torch.cat([r.flatten() for r in rises.values()]).sort().values[-6].item()  # five units above
    found = critical_units(gated, windows, threshold, candidates=48)
    assert sum(int(m.sum()) for m in found.values()) > 0
    for kind, rise in rises.items():
        assert not (found[kind] & (rise <= threshold)).any(), kind  # each found unit passes the threshold alone
    few = critical_units(gated, windows, threshold, candidates=4)["neuron"]
    top = torch.zeros_like(few)
    top.scatter_(1, input_magnitudes(gated, windows)["neuron"].topk(4, dim=1).indices, True)
    assert not (few & ~top).any()  # only the units of largest input magnitude are searched
    assert critical_units(gated, windows, 1e6)["head"].sum() == 0


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_a_replayed_dense_prefix_gives_the_whole_pass_logits_without_running_the_layers_before(family):
    from bayesprune.core.removal import DensePrefix

    gated = gate(tiny_model(family), GateConfig(units=("neuron",)))
    windows = SEQUENCES[:4]
    prefix = DensePrefix(gated, windows)
    ran = []
    hook = next(prefix.layers[0].children()).register_forward_pre_hook(lambda *_: ran.append(1))  # in layer 0
    for layer in range(gated.num_layers):
        off = torch.ones(gated.values.shape("neuron"))
        off[layer, :3] = 0
        with gated.gates_set({"neuron": off}):
            ran.clear()
            replayed = prefix.logits_from(layer)
            assert bool(ran) == (layer == 0)  # the first layer computed only when the change is in it
            with torch.no_grad():
                assert torch.equal(replayed, gated(input_ids=windows, use_cache=False).logits), layer
    hook.remove()
    assert not any("forward" in vars(layer) for layer in prefix.layers)  # every layer runs again


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_block_removal_scores_from_the_first_removed_block_on_are_the_whole_pass_scores(family):
    from bayesprune.core.likelihood import next_token_nll
    from bayesprune.core.removal import BlockScorer

    gated = gate(tiny_model(family), GateConfig(units=("block",)))
    windows = SEQUENCES[:6]
    scorer, unrecorded = (BlockScorer(gated, windows, "nll", batch_size=4, replay=r) for r in (True, False))
    for removed in ([], [0], [2], [1, 3], [3]):
        on = torch.ones(gated.num_layers)
        on[removed] = 0
        with gated.gates_set({"block": on}), torch.no_grad():
            whole = next_token_nll(gated(input_ids=windows, use_cache=False).logits, windows) / (windows.shape[1] - 1)
        assert torch.allclose(scorer(on), whole, rtol=0, atol=1e-6), removed
        assert torch.allclose(unrecorded(on), whole, rtol=0, atol=1e-6), removed
    assert all(p.outputs for p in scorer.prefixes) and not any(p.outputs for p in unrecorded.prefixes)


def test_a_search_records_layer_outputs_only_within_its_memory_budget(monkeypatch):
    from bayesprune.core import removal

    gated = gate(tiny_model("llama"), GateConfig(units=("block",)))
    assert removal.replay_affordable(gated, SEQUENCES)
    monkeypatch.setattr(removal, "REPLAY_BUDGET", SEQUENCES.numel() * 32 * gated.num_layers * 4 - 1)  # one short
    assert not removal.replay_affordable(gated, SEQUENCES)
    assert not any(s.replay for s in removal._scorers(gated, SEQUENCES, "nll", chunk=4, batch_size=4))


def test_the_prior_centres_critical_offsets_so_the_guide_starts_them_kept():
    critical = {"head": torch.zeros(4, 4, dtype=torch.bool), "neuron": torch.zeros(4, 48, dtype=torch.bool)}
    critical["head"][1, 2] = True
    prior = ShrinkagePrior(PriorConfig(), ("head", "neuron"), 4, {"head": 4, "neuron": 48})
    prior.protect(critical)
    assert set(prior.offset_means) == {"head"}  # a kind with none keeps mean 0
    guide = CostConditionedGuide(prior)
    expected = critical["head"].float() * PriorConfig().threshold_rise
    assert torch.equal(guide.loc_and_scale(next(s for s in prior.sites() if s.name == "head_offset"))[0], expected)
    site = next(s for s in prior.sites() if s.name == "head_offset")
    assert torch.equal(prior.distribution(site, {}).mean, expected)
    theta = {s.name: guide.loc_and_scale(s)[0].exp() if s.positive else guide.loc_and_scale(s)[0]
             for s in prior.sites()}
    importance = {"head": torch.ones(4, 4), "neuron": torch.ones(4, 48)}
    high = inclusion.probabilities(theta, importance, 20.0, prior.config)["head"]
    assert high[1, 2] > 0.99 and high[0, 0] < 0.5  # at the start, kept at a cost that drops the others
    none = ShrinkagePrior(PriorConfig(offset_scale=0), ("head",), 4, {"head": 4})
    none.protect(critical)
    assert none.offset_means == {}


def test_a_fit_scans_for_critical_units_on_four_windows_and_reports_them():
    from bayesprune import FitConfig, fit
    from bayesprune.core.removal import critical_units

    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    pick = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:4]
    rises = _single_removal_rises(gated, SEQUENCES[pick])
    largest = torch.cat([r.flatten() for r in rises.values()]).sort().values
    threshold = (largest[-3] + largest[-4]).item() / 2  # between two rises, away from rounding's reach
    expected = critical_units(gated, SEQUENCES[pick], threshold)
    result = fit(gated, SEQUENCES, FitConfig(steps=1, batch_size=4, seq_len=8, weights="frozen",
                                             critical_nll=threshold), progress=False)
    assert result.critical_units == {k: m.nonzero().tolist() for k, m in expected.items() if m.any()}
    # Three units pass alone; the scan finds the two of layer 3, and misses layer 1's, whose removal with the
    # layer's other head group raises the NLL less than the threshold (what its docstring says it cannot see).
    assert result.critical_units == {"head": [[3, 0], [3, 1]]}
    assert (rises["head"] > threshold).nonzero().tolist() == [[1, 1], [3, 0], [3, 1]]
    off = fit(gated, SEQUENCES, FitConfig(steps=1, batch_size=4, seq_len=8, weights="frozen", critical_nll=0),
              progress=False)
    assert off.critical_units == {}

import math

import pyro
import pytest
import torch

from bayesprune import CostConfig, FitConfig, GateConfig, fit, gate
from bayesprune.core.model import NonFiniteLossError
from bayesprune.run.rundir import RunDir
from tests.conftest import TINY_CONFIGS, VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))


def run(steps, checkpoint=None, weights="frozen", units=("block", "head", "neuron"), cost=None, sequences=SEQUENCES,
        **kw):
    gated = gate(tiny_model("llama"), GateConfig(units=units))
    config = FitConfig(steps=steps, batch_size=4, seq_len=12, weights=weights, checkpoint_every=2, **kw)
    return fit(gated, sequences, config, cost=cost, checkpoint=checkpoint, progress=False)


def guide_state(result):
    return {k: v.clone() for k, v in result.guide.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_seed_reproduces_the_fit():
    a, b = run(4), run(4)
    assert a.history == b.history
    assert_same_state(guide_state(a), guide_state(b))
    c = run(4, seed=1)
    assert c.history != a.history


def test_fit_moves_the_guide_and_keeps_frozen_weights():
    model_before = {k: v.clone() for k, v in tiny_model("llama").state_dict().items()}
    result = run(5)
    assert len(result.history) == 5 and {"cost", "loss"} <= set(result.history[0])
    offsets = result.guide.neuron_offset_loc
    assert not torch.allclose(offsets, torch.zeros_like(offsets))
    with result.gated.unwrapped() as model:
        for key, value in model.state_dict().items():
            assert torch.equal(value, model_before[key]), key


def test_joint_fit_trains_the_weights_and_reads_importance_from_them():
    from bayesprune.core.inclusion import unit_importance

    before = {k: v.clone() for k, v in unit_importance(gate(tiny_model("llama"), GateConfig())).items()}
    frozen = run(3, units=("head", "neuron"))
    assert all(torch.equal(frozen.model.importance[k], before[k]) for k in before)
    result = run(3, weights="joint", units=("head", "neuron"), weight_lr=0.05)
    with result.gated.unwrapped() as model:
        assert any(not torch.equal(v, tiny_model("llama").state_dict()[k]) for k, v in model.state_dict().items())
    after = unit_importance(result.gated)
    for kind in before:
        assert torch.equal(result.model.importance[kind], after[kind]) and not after[kind].requires_grad
        assert not torch.allclose(after[kind], before[kind])


def test_a_fit_learns_to_keep_less_at_higher_cost():
    result = run(40, units=("head", "neuron"), cost=CostConfig(zero_probability=0.0, rate=0.5), guide_lr=0.1)
    posterior = result.posterior()
    assert posterior.expected_fraction(0.0) == 1.0
    assert posterior.expected_fraction(0.05) > posterior.expected_fraction(1.0) > posterior.expected_fraction(20.0)


def test_a_stratified_fit_steps_through_the_stratified_costs_of_its_seed():
    from bayesprune.core.fit import step_costs

    config = CostConfig(spacing="stratified")
    result = run(6, units=("head", "neuron"), cost=config, seed=2)
    assert [[r["cost"]] for r in result.history] == [step_costs(config, 2, s) for s in range(6)]


def test_a_step_at_several_costs_is_the_mean_of_its_parts_elbos_each_at_its_cost():
    from pyro.infer import Trace_ELBO

    from bayesprune import PriorConfig
    from bayesprune.core.fit import SplitELBO
    from bayesprune.core.guide import CostConditionedGuide
    from bayesprune.core.model import PruningModel

    model = PruningModel(gate(tiny_model("llama"), GateConfig(units=("head", "neuron"))), SEQUENCES, PriorConfig())
    guide = CostConditionedGuide(model.prior)
    batch = torch.tensor([5, 1, 7, 2])
    pyro.set_rng_seed(3)
    split = SplitELBO(model, guide)(batch, [0.0, 2.0])
    last = model.last_step
    pyro.set_rng_seed(3)
    parts = [Trace_ELBO()(model, guide)(batch[:2], 0.0)]
    nll = model.last_step["nll"]
    parts.append(Trace_ELBO()(model, guide)(batch[2:], 2.0))
    assert split.item() == pytest.approx((parts[0] + parts[1]).item() / 2, rel=1e-6)
    assert last["nll"] == pytest.approx((nll + model.last_step["nll"]) / 2, rel=1e-6)
    pyro.set_rng_seed(3)
    one = SplitELBO(model, guide)(batch, [1.0])
    pyro.set_rng_seed(3)
    assert one.item() == Trace_ELBO()(model, guide)(batch, 1.0).item()


def test_a_fit_at_several_costs_per_step_records_them_and_refuses_more_parts_than_windows():
    from bayesprune.core.fit import step_costs

    config = CostConfig(per_step=2)
    result = run(4, units=("head", "neuron"), cost=config, seed=1)
    assert [r["costs"] for r in result.history] == [step_costs(config, 1, s) for s in range(4)]
    assert all(r["windows"] == 4 and math.isfinite(r["loss"]) for r in result.history)
    with pytest.raises(ValueError, match="per_step=8"):
        run(2, cost=CostConfig(per_step=8))


def test_a_fixed_cost_fit_is_the_same_model_read_at_its_cost():
    result = run(4, units=("head", "neuron"), cost=CostConfig(fixed=0.8))
    assert {r["cost"] for r in result.history} == {0.8}
    posterior = result.posterior()
    assert posterior.fixed_cost == 0.8
    assert torch.equal(posterior.inclusion()["head"], posterior.inclusion(0.8)["head"])


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_gate_kind_moves_the_loss_in_every_family(family):
    from pyro.infer import Trace_ELBO

    from bayesprune import PriorConfig
    from bayesprune.core.guide import CostConditionedGuide
    from bayesprune.core.model import PruningModel

    units = tuple(u for u in ("block", "attn", "mlp", "head", "neuron") if not (family == "gpt2" and u == "head"))
    gated = gate(tiny_model(family), GateConfig(units=units))
    model = PruningModel(gated, SEQUENCES, PriorConfig())
    guide = CostConditionedGuide(model.prior)
    torch.manual_seed(0)
    Trace_ELBO()(model, guide)(torch.arange(4), 1.0).backward()
    for kind in units:
        for name in ("offset", "threshold_curve"):
            grad = guide.get_parameter(f"{kind}_{name}_loc_unconstrained").grad
            assert grad is not None and grad.abs().sum() > 0, (kind, name)


@pytest.mark.parametrize("weights", ["frozen", "joint", "lora"])
def test_resume_after_an_interrupt_gives_the_same_result(tmp_path, weights):
    straight = run(6, weights=weights)

    gated = gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron")))
    calls = []

    def interrupt(module, args, output):
        if torch.is_grad_enabled():  # SVI steps, not the critical-unit scan before them
            calls.append(1)
        if len(calls) == 4:  # the forward of the 4th step
            raise KeyboardInterrupt

    handle = gated.model.model.layers[1].register_forward_hook(interrupt)
    config = FitConfig(steps=6, batch_size=4, seq_len=12, weights=weights, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        fit(gated, SEQUENCES, config, checkpoint=tmp_path / RunDir.CHECKPOINT, progress=False)
    handle.remove()
    assert (tmp_path / RunDir.CHECKPOINT).exists()

    resumed = fit(gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron"))), SEQUENCES, config,
                  checkpoint=tmp_path / RunDir.CHECKPOINT, progress=False)
    assert resumed.history == straight.history
    assert_same_state(guide_state(resumed), guide_state(straight))
    if weights != "frozen":
        with resumed.gated.unwrapped() as a, straight.gated.unwrapped() as b:
            assert_same_state(a.state_dict(), b.state_dict())


def test_a_cosine_fit_resumes_only_for_the_steps_it_was_planned_with_and_a_constant_one_extends(tmp_path):
    run(2, checkpoint=tmp_path / "cosine.safetensors")
    with pytest.raises(ValueError, match="step count of a cosine schedule"):
        run(4, checkpoint=tmp_path / "cosine.safetensors")
    run(2, checkpoint=tmp_path / "constant.safetensors", schedule="constant")
    extended = run(4, checkpoint=tmp_path / "constant.safetensors", schedule="constant")
    assert len(extended.history) == 4
    assert_same_state(guide_state(extended), guide_state(run(4, schedule="constant")))


def test_non_finite_elbo_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    run(2, checkpoint=tmp_path / RunDir.CHECKPOINT, schedule="constant")  # resumed below for more steps
    saved = (tmp_path / RunDir.CHECKPOINT).read_bytes()
    config = FitConfig(steps=4, batch_size=4, seq_len=12, checkpoint_every=2, weights="frozen", schedule="constant")
    for module, expected in (("norm", r"sequences \["), ("down_proj", r"inclusion probabilities of \['neuron'\]")):
        gated = gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron")))
        with torch.no_grad():
            broken = gated.model.model.norm if module == "norm" else gated.model.model.layers[2].mlp.down_proj
            broken.weight.fill_(float("nan"))
        with pytest.raises(NonFiniteLossError, match=f"not finite at step 2.*{expected}.*checkpoint .* is intact"):
            fit(gated, SEQUENCES, config, checkpoint=tmp_path / RunDir.CHECKPOINT, progress=False)
        assert (tmp_path / RunDir.CHECKPOINT).read_bytes() == saved


def test_bad_sequences_are_refused():
    with pytest.raises(ValueError, match="sequences must be"):
        fit(gate(tiny_model("llama")), SEQUENCES[0], FitConfig(steps=1), progress=False)


@pytest.mark.parametrize("other", [dict(units=("neuron",)), dict(seed=1), dict(cost=CostConfig(fixed=1.0)),
                                   dict(sequences=SEQUENCES.flip(0))], ids=["gates", "seed", "cost", "data"])
def test_a_checkpoint_of_another_fit_is_refused_and_kept(tmp_path, other):
    run(2, checkpoint=tmp_path / RunDir.CHECKPOINT)
    saved = (tmp_path / RunDir.CHECKPOINT).read_bytes()
    with pytest.raises(ValueError, match="belongs to another fit"):
        run(2, checkpoint=tmp_path / RunDir.CHECKPOINT, **other)
    assert (tmp_path / RunDir.CHECKPOINT).read_bytes() == saved
    assert run(2, checkpoint=tmp_path / RunDir.CHECKPOINT).history  # the same fit still resumes


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / RunDir.CHECKPOINT).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        run(2, checkpoint=tmp_path / RunDir.CHECKPOINT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_fit_runs_with_weights_in_another_dtype_and_the_cut_keeps_it(dtype):
    """Frozen weights stay in their dtype; gates and the guide are float32; the extracted model keeps the dtype."""
    from bayesprune import extract

    model = tiny_model("llama").to(dtype)
    gated = gate(model, GateConfig(units=("block", "head", "neuron")))
    result = fit(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, seq_len=12), progress=False)
    assert all(p.dtype == torch.float32 for p in result.guide.parameters())
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    posterior = result.posterior()
    model = gated.remove()
    assert all(p.dtype == dtype for p in model.parameters())
    small, plan = extract(model, posterior, "0.6")
    assert {p.dtype for p in small.parameters()} == {dtype} and plan.fraction <= 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_fit_on_cuda_keeps_everything_on_the_device():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    gated = gate(model, GateConfig(units=("block", "head", "neuron")))
    result = fit(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, seq_len=12), progress=False)
    assert all(p.device.type == "cuda" for p in result.guide.parameters())
    assert result.posterior().inclusion_mean(1.0)["neuron"].device.type == "cpu"


@pytest.mark.parametrize("weights", ["frozen", "joint"])
def test_gradient_checkpointing_gives_the_same_fit(weights):
    """Recomputed activations change memory, not the result: the gates get the same gradients, frozen or not."""
    plain = run(3, weights=weights)
    checkpointed = run(3, weights=weights, gradient_checkpointing=True)
    assert [r["loss"] for r in plain.history] == pytest.approx([r["loss"] for r in checkpointed.history], rel=1e-5)
    for (name, a), b in zip(plain.guide.state_dict().items(), checkpointed.guide.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert not any(type(m).__name__ == "CheckpointedBlock" for m in checkpointed.gated.model.modules())

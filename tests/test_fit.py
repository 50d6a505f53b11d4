import pytest
import torch

from bayesprune import FitConfig, GateConfig, NonFiniteLossError, PriorConfig, fit, gate
from bayesprune.fit import CHECKPOINT_FILE
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))


def run(steps, run_dir=None, weights="frozen", units=("block",), **kw):
    gated = gate(tiny_model("llama"), GateConfig(units=units))
    config = FitConfig(steps=steps, batch_size=4, seq_len=12, weights=weights, checkpoint_every=2, **kw)
    return fit(gated, SEQUENCES, config, run_dir=run_dir, progress=False)


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
    assert len(result.history) == 5
    locs = result.guide.state_dict()["locs.block_logit_unconstrained"]
    assert not torch.allclose(locs, torch.full_like(locs, PriorConfig().mean_logit_loc))
    with result.gated.unwrapped() as model:
        for key, value in model.state_dict().items():
            assert torch.equal(value, model_before[key]), key


def test_joint_fit_trains_the_weights():
    result = run(3, weights="joint")
    with result.gated.unwrapped() as model:
        before = tiny_model("llama").state_dict()
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("weights", ["frozen", "joint"])
def test_resume_after_an_interrupt_gives_the_same_result(tmp_path, weights):
    straight = run(6, weights=weights)

    gated = gate(tiny_model("llama"), GateConfig())
    calls = []

    def interrupt(module, args, output):
        calls.append(1)
        if len(calls) == 5:  # one setup trace, then the forward of the 4th step
            raise KeyboardInterrupt

    handle = gated.model.model.layers[1].register_forward_hook(interrupt)
    config = FitConfig(steps=6, batch_size=4, seq_len=12, weights=weights, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        fit(gated, SEQUENCES, config, run_dir=tmp_path, progress=False)
    handle.remove()
    assert (tmp_path / CHECKPOINT_FILE).exists()

    resumed = fit(gate(tiny_model("llama"), GateConfig()), SEQUENCES, config, run_dir=tmp_path, progress=False)
    assert resumed.history == straight.history
    assert_same_state(guide_state(resumed), guide_state(straight))
    if weights == "joint":
        with resumed.gated.unwrapped() as a, straight.gated.unwrapped() as b:
            assert_same_state(a.state_dict(), b.state_dict())


def test_non_finite_elbo_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    run(2, run_dir=tmp_path)
    saved = (tmp_path / CHECKPOINT_FILE).read_bytes()
    gated = gate(tiny_model("llama"), GateConfig())
    with torch.no_grad():
        gated.model.model.layers[2].mlp.down_proj.weight.fill_(float("nan"))
    config = FitConfig(steps=4, batch_size=4, seq_len=12, checkpoint_every=2)
    expected = r"not finite while setting up the guide.*sequences \[.*checkpoint in .* is intact"
    with pytest.raises(NonFiniteLossError, match=expected):
        fit(gated, SEQUENCES, config, run_dir=tmp_path, progress=False)
    assert (tmp_path / CHECKPOINT_FILE).read_bytes() == saved


def test_bad_sequences_are_refused():
    with pytest.raises(ValueError, match="sequences must be"):
        fit(gate(tiny_model("llama")), SEQUENCES[0], FitConfig(steps=1), progress=False)


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        run(2, run_dir=tmp_path)

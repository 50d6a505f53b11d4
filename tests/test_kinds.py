"""A gate kind is one registry entry: a kind defined in this file alone is gated, fitted, planned and extracted."""

import pytest
import torch

from bayesprune import FitConfig, GateConfig, ModelTotals, extract_model, fit, gate, load_pruned, save_extracted
from bayesprune.core.kinds import KINDS, GateKind, register
from tests.conftest import VOCAB, tiny_model

SEQUENCES = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def pair(monkeypatch):
    """FFN neurons gated two neighbours at a time: one latent gate per pair."""
    kind = GateKind("pair", "width", "two neighbouring FFN neurons", branch="mlp", plural="pairs",
                    slices="neuron", group=2, fills=True,
                    config_fields=lambda kept, widths, arch: {arch.neuron_field: 2 * kept})
    monkeypatch.setitem(KINDS, "pair", kind)
    return kind


@pytest.mark.parametrize("form", ["per-layer", "uniform"])
def test_a_kind_registered_here_fits_plans_and_extracts(pair, form, tmp_path):
    model = tiny_model("llama")
    ids = SEQUENCES[:2]
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    gated = gate(model, GateConfig(units=("head", "pair")))
    assert gated.values.units == {"head": 2, "pair": 24}
    with torch.no_grad():
        assert torch.equal(gated(input_ids=ids).logits, dense)  # gates at 1: the original logits
    result = fit(gated, SEQUENCES, FitConfig(steps=3, batch_size=4, seq_len=12, weights="frozen", seed=0),
                 progress=False)
    posterior = result.posterior()
    assert posterior.inclusion(1.0)["pair"].shape[-2:] == (4, 24)
    plan = posterior.plan("0.6", ModelTotals.of(model), form, multiple=2 if form == "uniform" else 1)
    kept = [layer.kept("pair") for layer in plan.layers if layer.mlp]
    assert kept and all(len(units) < 24 for units in kept) and plan.fraction <= 0.6
    assert all(len(units) % 2 == 0 for units in kept) or form == "per-layer"
    hard = plan.gates(gated.kinds, gated.values.units)
    with torch.no_grad(), gated.gates_set(hard, posterior.amplitudes(plan.cost, point=True)):
        expected = gated(input_ids=ids).logits
    network = gated.remove()
    small = extract_model(network, plan)
    mlp = small.model.layers[0].mlp if form == "uniform" else None
    if mlp is not None:
        assert mlp.down_proj.weight.shape[1] == 2 * len(plan.layers[0].kept("pair"))
    with torch.no_grad():
        assert torch.allclose(small(input_ids=ids).logits, expected, atol=1e-4)
    save_extracted(small, None, tmp_path / "small", plan.record())
    with torch.no_grad():
        assert torch.allclose(load_pruned(tmp_path / "small")(input_ids=ids).logits, expected, atol=1e-4)
    assert plan.record()["layers"][0]["pairs"] == plan.layers[0].kept("pair")


def test_the_registry_refuses_what_it_cannot_hold(pair):
    with pytest.raises(ValueError, match="registered already"):
        register(KINDS["head"])
    with pytest.raises(ValueError, match="one lower-case word"):
        GateKind("neuron_pair", "width", "", branch="mlp", plural="pairs", slices="neuron")
    with pytest.raises(ValueError, match="needs a branch"):
        GateKind("pairs", "width", "")
    with pytest.raises(ValueError, match="two ways"):
        GateConfig(units=("neuron", "pair"))
    assert GateConfig(units=("pair", "block")).units == ("block", "pair")

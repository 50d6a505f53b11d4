import pyro
import pytest
import torch
from pyro import poutine

from bayesprune import GateConfig, PriorConfig, gate
from bayesprune.model import PruningModel, kept_fraction, kept_parameters
from tests.conftest import VOCAB, tiny_model


def test_kept_fraction_counts_nesting():
    zero, two = torch.zeros(2), torch.full((2,), 2.0)
    sizes = {"attn": torch.tensor([2.0, 2.0]), "mlp": torch.tensor([6.0, 6.0]), "other": torch.tensor([1.0, 1.0]),
             "head": zero, "neuron": zero, "heads": two, "neurons": two}
    full = kept_fraction({}, sizes)
    assert full.item() == 1.0
    # Block 1 off removes all 9 of its parameters, whatever its branches say.
    z = {"block": torch.tensor([1.0, 0.0]), "attn": torch.tensor([0.0, 1.0]), "mlp": torch.tensor([1.0, 1.0])}
    assert kept_fraction(z, sizes).item() == pytest.approx((6 + 1) / 18)
    draws = {"block": torch.tensor([[1.0, 1.0], [0.0, 1.0]])}
    assert kept_fraction(draws, sizes).tolist() == [1.0, 0.5]


def test_width_units_count_only_under_open_ancestors():
    # Per layer: 1 norm, attn = 1 fixed + 2 heads × 3, mlp = 0 fixed + 4 neurons × 2 → 16.
    sizes = {"other": torch.ones(2), "attn": torch.ones(2), "head": torch.full((2,), 3.0),
             "mlp": torch.zeros(2), "neuron": torch.full((2,), 2.0),
             "heads": torch.full((2,), 2.0), "neurons": torch.full((2,), 4.0)}
    assert kept_parameters({}, sizes).item() == 32
    z = {"block": torch.tensor([1.0, 0.0]), "mlp": torch.tensor([1.0, 1.0]),
         "head": torch.tensor([[1.0, 0.0], [1.0, 1.0]]), "neuron": torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2)}
    assert kept_parameters(z, sizes).item() == 1 + (1 + 3) + 2 * 2
    z["mlp"] = torch.tensor([0.0, 1.0])
    assert kept_parameters(z, sizes).item() == 1 + (1 + 3)


def test_width_sites_are_layer_by_unit():
    pyro.clear_param_store()
    gated = gate(tiny_model("llama"), GateConfig(units=("head", "neuron")))
    sequences = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(0))
    model = PruningModel(gated, sequences, PriorConfig())
    trace = poutine.trace(model).get_trace(torch.arange(2))
    assert trace.nodes["neuron_logit"]["value"].shape == (4, 48)
    assert trace.nodes["neuron_layer_logit"]["value"].shape == (4, 1)
    assert trace.nodes["head_gate"]["value"].shape == (4, 2)
    assert set(trace.nodes["neuron_gate"]["value"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("units", [("block",), ("block", "attn", "mlp")])
def test_model_sites_shapes_and_scaling(units):
    pyro.clear_param_store()
    gated = gate(tiny_model("llama"), GateConfig(units=units))
    sequences = torch.randint(0, VOCAB, (10, 8), generator=torch.Generator().manual_seed(0))
    prior = PriorConfig(cost=0.7)
    model = PruningModel(gated, sequences, prior)
    trace = poutine.trace(model).get_trace(torch.tensor([0, 3]))
    for kind in units:
        assert trace.nodes[f"{kind}_mean_logit"]["value"].shape == ()
        assert trace.nodes[f"{kind}_global_scale"]["value"].shape == ()
        assert trace.nodes[f"{kind}_local_scale"]["value"].shape == (4,)
        assert trace.nodes[f"{kind}_logit"]["value"].shape == (4,)
        gates = trace.nodes[f"{kind}_gate"]["value"]
        assert set(gates.tolist()) <= {0.0, 1.0}, "straight-through gates are exactly 0 or 1 going forward"
    assert model.num_tokens == 10 * 7
    gates = {k: trace.nodes[f"{k}_gate"]["value"].double() for k in units}
    cost = trace.nodes["cost"]["fn"].log_factor
    assert cost.item() == pytest.approx(-0.7 * 70 * kept_fraction(gates, model.sizes).item(), rel=1e-5)
    likelihood = trace.nodes["likelihood"]
    assert likelihood["scale"] == pytest.approx(10 / 2), "the mini-batch is scaled to the corpus"
    assert likelihood["fn"].log_factor.shape == (2,)
    gated.values.clear()

import pytest
import torch

from bayesprune import GateConfig, gate
from bayesprune.architectures import decoder_layers
from tests.conftest import VOCAB, tiny_model

UNIT_SETS = [("block",), ("attn", "mlp"), ("block", "attn", "mlp")]


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("units", UNIT_SETS)
def test_open_and_unit_gates_give_the_original_logits_exactly(family, units, ids):
    model = tiny_model(family)
    reference = model(ids).logits
    gated = gate(model, GateConfig(units=units))
    assert torch.equal(gated(input_ids=ids).logits, reference)
    with gated.gates_set({k: torch.ones(4) for k in units}):
        assert torch.equal(gated(input_ids=ids).logits, reference)


def test_a_closed_gate_changes_the_logits(family, ids):
    gated = gate(tiny_model(family), GateConfig(units=("block", "attn", "mlp")))
    reference = gated(input_ids=ids).logits
    for kind in ("block", "attn", "mlp"):
        with gated.gates_set({kind: torch.tensor([1.0, 0.0, 1.0, 1.0])}):
            assert not torch.allclose(gated(input_ids=ids).logits, reference)


def test_remove_restores_the_untouched_model(family, ids):
    model = tiny_model(family)
    classes = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    gated = gate(model, GateConfig(units=("block", "attn", "mlp")))
    assert list(gated.model.state_dict()) != keys
    restored = gated.remove()
    assert restored is model
    assert [type(m) for m in restored.modules()] == classes
    assert list(restored.state_dict()) == keys


def test_gating_twice_is_refused():
    gated = gate(tiny_model("llama"))
    with pytest.raises(ValueError, match="already carries bayesprune gates"):
        gate(gated.model)


def test_gate_values_are_checked():
    gated = gate(tiny_model("llama"))
    with pytest.raises(ValueError, match="need 4 values"):
        gated.set_gates({"block": torch.ones(3)})
    with pytest.raises(KeyError, match="no gates of kind"):
        gated.set_gates({"attn": torch.ones(4)})


def test_unit_parameters_add_up_to_the_blocks():
    model = tiny_model("llama")
    sizes = gate(model, GateConfig(units=("attn",))).unit_parameters()
    blocks = sum(p.numel() for b in decoder_layers(model) for p in b.parameters())
    assert sum(v.sum() for v in sizes.values()).item() == blocks
    attn = sum(p.numel() for p in decoder_layers(model)[0].self_attn.parameters())
    assert sizes["attn"][0].item() == attn

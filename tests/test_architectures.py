import pytest
from transformers import AutoModelForCausalLM, OPTConfig

from bayesprune.core.architectures import (ARCHITECTURES, UnsupportedArchitectureError, architecture_of,
                                      decoder_layers, layer_names)
from tests.conftest import TINY_CONFIGS, tiny_model


def test_every_table_row_has_a_tiny_model_test():
    assert set(ARCHITECTURES) == set(TINY_CONFIGS)


def test_each_family_resolves_its_blocks(family):
    model = tiny_model(family)
    arch = architecture_of(model)
    layers = decoder_layers(model)
    assert len(layers) == 4
    assert layer_names(model) == [f"{arch.layers}.{i}" for i in range(4)]
    assert all(hasattr(b, arch.attention) and hasattr(b, arch.mlp) for b in layers)


def test_unsupported_model_names_its_class_and_what_is_missing():
    model = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                       ffn_dim=32, num_attention_heads=2))
    with pytest.raises(UnsupportedArchitectureError, match=r"OPTForCausalLM.*'opt'.*ARCHITECTURES"):
        architecture_of(model)


def test_base_model_without_lm_head_gets_a_clear_error():
    model = tiny_model("llama").model  # LlamaModel: blocks live at .layers, not .model.layers
    with pytest.raises(UnsupportedArchitectureError, match="LlamaModel has no module at 'model.layers'"):
        architecture_of(model)

"""Build models whose blocks differ in width: the loader for ``per_layer_config`` checkpoints.

``transformers`` 5.x reads and writes ``per_layer_config`` (``HeterogeneousConfigMixin``)
but its Llama-family modelling code still builds every block from the global
config. :func:`load_pruned` builds each block from its own layer config where the
shapes differ, puts a no-op in place of branches listed in ``skip``, and loads
the weights (safetensors only). Where ``transformers`` already builds the right
shapes, nothing is replaced, so the loader keeps working once it does.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.architectures import architecture_for_config, decoder_layers


class SkippedAttention(nn.Module):
    """A removed attention branch: adds nothing, and keeps the KV cache's length right."""

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            empty = hidden_states.new_zeros(hidden_states.shape[0], 0, hidden_states.shape[1], self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class SkippedMLP(nn.Module):
    """A removed MLP branch: adds nothing."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@contextlib.contextmanager
def global_access(config):
    """Allow reading global values of per-layer attributes (``transformers`` checks need it), quietly."""
    import logging

    log = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    config.allow_global_per_layer_attribute_access = True
    try:
        yield config
    finally:
        config.__dict__.pop("allow_global_per_layer_attribute_access", None)
        log.setLevel(level)


def build_model(config, state: dict[str, torch.Tensor]) -> nn.Module:
    """A causal LM for ``config`` (per-layer widths and skips included) holding ``state``."""
    from transformers import AutoModelForCausalLM

    arch = architecture_for_config(config)
    heterogeneous = getattr(config, "is_heterogeneous", False)
    with global_access(config):
        model = AutoModelForCausalLM.from_config(config)
        layers = decoder_layers(model)
        for i in range(len(layers) if heterogeneous else 0):
            layer_config = config.per_layer_config[i]
            prefix = f"{arch.layers}.{i}."
            wanted = {n[len(prefix):]: tuple(t.shape) for n, t in state.items() if n.startswith(prefix)}
            built = _shapes(layers[i])
            if any(built.get(n, shape) != shape for n, shape in wanted.items()):
                layers[i] = type(layers[i])(layer_config, layer_idx=i)
            for name in getattr(layer_config, "skip", []):
                if name == arch.attention:
                    head_dim = getattr(layer_config, "head_dim", None) or \
                        layer_config.hidden_size // layer_config.num_attention_heads
                    setattr(layers[i], name, SkippedAttention(i, head_dim))
                elif name == arch.mlp:
                    setattr(layers[i], name, SkippedMLP())
                else:
                    raise ValueError(f"cannot skip {name!r} in a {arch.family} block")
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]  # a tied head is not saved
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the config: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_config(path: str | Path):
    """A model config from ``path/config.json``, ``per_layer_config`` applied after validation.

    (``transformers`` 5.x validates Llama-family configs by reading global head
    counts, which a per-layer config refuses to give.)
    """
    from transformers import AutoConfig

    values = json.loads((Path(path) / "config.json").read_text())
    per_layer = values.pop("per_layer_config", None)
    if "model_type" not in values:
        raise ValueError(f"{path}/config.json has no model_type; it is not a transformers config")
    config = AutoConfig.for_model(**values)
    if per_layer:
        config.per_layer_config = per_layer
    return config


def load_pruned(path: str | Path) -> nn.Module:
    """Load an extracted checkpoint, uniform or per-layer (safetensors weights only)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    state = {}
    for file in files:
        state.update(load_file(file))
    return build_model(load_config(path), state)

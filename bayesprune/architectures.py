"""Where each model family keeps its decoder blocks: one table row per family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Architecture:
    """How to find the prunable structure of one family of causal LMs.

    ``layers`` is the dotted path from the ``*ForCausalLM`` module to the
    ``ModuleList`` of decoder blocks; ``attention`` and ``mlp`` are attributes of a
    block. ``per_layer_fields`` are config lists with one entry per block, sliced
    when blocks are removed.
    """

    family: str
    layers: str
    attention: str
    mlp: str
    per_layer_fields: tuple[str, ...] = ("layer_types",)


_LLAMA_LIKE = dict(layers="model.layers", attention="self_attn", mlp="mlp")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA_LIKE),
    "mistral": Architecture("mistral", **_LLAMA_LIKE),
    "qwen2": Architecture("qwen2", **_LLAMA_LIKE),
    "qwen3": Architecture("qwen3", **_LLAMA_LIKE),
    "olmo2": Architecture("olmo2", **_LLAMA_LIKE),
    "gpt2": Architecture("gpt2", layers="transformer.h", attention="attn", mlp="mlp"),
}


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in :data:`ARCHITECTURES` or does not match its row."""


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def architecture_of(model: nn.Module) -> Architecture:
    """The table row for ``model``; a clear error names what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{name} (model_type={model_type!r}) is not supported: bayesprune.architectures."
            f"ARCHITECTURES has no row saying where its decoder blocks, attention and MLP are. "
            f"Supported model types: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    try:
        layers = _resolve(model, arch.layers)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{name} has no module at {arch.layers!r}, where the {arch.family} row expects the "
            f"decoder blocks (a base model without an LM head? load it with AutoModelForCausalLM)"
        ) from err
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"{name}.{arch.layers} is not a non-empty ModuleList")
    for attr in (arch.attention, arch.mlp):
        if not hasattr(layers[0], attr):
            raise UnsupportedArchitectureError(
                f"decoder block {type(layers[0]).__name__} of {name} has no {attr!r} module "
                f"named in the {arch.family} row"
            )
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _resolve(model, architecture_of(model).layers)


def layer_names(model: nn.Module) -> list[str]:
    """Real module names of the decoder blocks, e.g. ``model.layers.3``."""
    prefix = architecture_of(model).layers
    return [f"{prefix}.{i}" for i in range(len(decoder_layers(model)))]


def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def count_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` at their stored dtype, shared tensors once."""
    return sum(p.numel() * p.element_size() for p in module.parameters())

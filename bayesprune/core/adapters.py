"""Low-rank adapters (LoRA, through ``peft``) on every block projection, fitted with the gates, then merged.

``weights="lora"`` fits ``W + (α / r) · B A`` on the attention and MLP projections of
every block, with ``W`` frozen, jointly with the gates. Sizes and unit importance
are read from ``W`` before the adapters go in (an adapter adds no unit). When the fit
ends the adapters are merged into ``W`` and taken out, so everything downstream sees
a plain model; a run keeps only the adapter tensors, which are merged again into
the kept slices when its model is loaded or streamed.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .architectures import Architecture, architecture_for_config

ADAPTER = "default"
_A, _B = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"


def adapted_modules(arch: Architecture) -> list[str]:
    """The projections of a block that get adapters: every weight cut by width, and the branch outputs."""
    return list(dict.fromkeys([piece.module for piece in arch.width] + list(arch.outputs)))


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def add_adapters(gated, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
    """Put rank-``rank`` adapters on ``gated``'s block projections (inside its gate wrappers); the base weights
    are frozen, and the adapters' parameters returned. ``B`` starts at zero, so the network is unchanged;
    ``A``'s random start is drawn from ``seed``. On a bfloat16 or float16 network the adapters' weights stay
    float32 (late steps of a decaying rate are below a half-precision weight's rounding step) and compute in the
    network's dtype, as mixed-precision training does: ``peft`` would cast every input up to float32 and add the
    adapters' output in float32, which made a step of an adapter fit on a CPU 1.25 × as slow. Each layer's
    forward is :func:`_adapted`: the scaling folded into ``B`` and the sum with the base output one ``addmm``."""
    from peft import LoraConfig, inject_adapter_in_model

    from .gates import _Wrapper

    arch = gated.arch
    wanted = {f"{arch.layers}.{i}.{m}" for i in range(gated.num_layers) for m in adapted_modules(arch)}
    # A projection's path may pass through gate wrappers (".wrapped"); the adapter goes on the layer inside.
    keys = [name for name, module in gated.model.named_modules()
            if name.replace(".wrapped", "") in wanted and not isinstance(module, _Wrapper)]
    if not keys:
        raise ValueError(f"no projections of {arch.family} blocks can take an adapter")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=keys,
                        fan_in_fan_out=arch.transposed, bias="none")
    for p in gated.model.parameters():
        p.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, gated.model, adapter_name=ADAPTER)
    trainable = [p for name, p in gated.model.named_parameters() if ".lora_" in name]
    for p in trainable:
        if p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
        p.requires_grad_(True)
    for _, layer in _lora_layers(gated.model):
        layer.forward = functools.partial(_adapted, layer)
    return trainable


def _adapted(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A LoRA layer's forward, ``base(x) + x Aᵀ (s B)ᵀ``, in the dtype of its input (the network's): the
    float32 ``A`` and ``s B`` cast down, the low-rank product added to the base output by one ``addmm``, where
    ``peft`` scales the product and adds it in two more passes over the output."""
    result = layer.base_layer(x, *args, **kwargs)
    if layer.disable_adapters or layer.merged:
        return result
    a = layer.lora_A[ADAPTER].weight.to(x.dtype)
    b = (layer.lora_B[ADAPTER].weight * layer.scaling[ADAPTER]).to(x.dtype)
    low = nn.functional.linear(x, a).flatten(0, -2)
    return torch.addmm(result.flatten(0, -2), low, b.T).view(result.shape)


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the base layer back in its place."""
    _take_out(model, merge=True)


def remove_adapters(model: nn.Module) -> None:
    """Put every base layer back in its place, its adapter dropped unmerged (no adapters: nothing to do)."""
    _take_out(model, merge=False)


def _take_out(model: nn.Module, merge: bool) -> None:
    if hasattr(model, "peft_config"):  # what injecting left on the model
        del model.peft_config
    for name, layer in _lora_layers(model):
        if merge:
            layer.merge(adapter_names=[ADAPTER])
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The network without its adapters for the duration of the block."""
    layers = [layer for _, layer in _lora_layers(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@contextlib.contextmanager
def adapters_scaled(model: nn.Module, share: float):
    """The network with every adapter at ``share`` of its fitted size for the duration of the block (what
    merging that share gives)."""
    layers = [layer for _, layer in _lora_layers(model)]
    fitted = [layer.scaling[ADAPTER] for layer in layers]
    for layer, scale in zip(layers, fitted):
        layer.scaling[ADAPTER] = scale * share
    try:
        yield model
    finally:
        for layer, scale in zip(layers, fitted):
            layer.scaling[ADAPTER] = scale


def adapter_deltas(tensors: dict[str, torch.Tensor], config, scale: float) -> dict[str, torch.Tensor]:
    """``weight name → (α / r) · B A`` from a checkpoint's adapter tensors (``network.…lora_A/B…``), in the
    layout the weight is stored in."""
    transposed = architecture_for_config(config).transposed
    deltas = {}
    for key, a in tensors.items():
        if key.startswith("network.") and key.endswith(_A):
            base = key.removeprefix("network.").removesuffix(_A)
            delta = scale * (tensors[f"network.{base}{_B}"].double() @ a.double())
            deltas[f"{base}.weight"] = delta.T if transposed else delta
    return deltas


@torch.no_grad()
def merge_checkpoint_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], scale: float) -> None:
    """Add a checkpoint's adapters into the matching weights of ``model`` (a plain model)."""
    parameters = dict(model.named_parameters())
    for name, delta in adapter_deltas(tensors, model.config, scale).items():
        if name not in parameters or parameters[name].shape != delta.shape:
            raise ValueError(f"the checkpoint's adapter for {name} does not fit this model")
        parameters[name].add_(delta.to(parameters[name]))

"""From a posterior and a target size to a real, smaller Hugging Face checkpoint.

Targets: ``"12layers"`` (blocks kept), ``0.5`` or ``"50%"`` (fraction of decoder
parameters kept), ``"80M"`` / ``"1.2B"`` / ``"80000000"`` (parameters of the whole
model), ``"300MB"`` (weight bytes, MB = 10⁶ bytes, at the model's dtype). The
largest model that does not exceed the target is chosen, removing blocks in order
of posterior keep probability.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .architectures import architecture_of, count_bytes, count_parameters, decoder_layers
from .io import atomic_directory
from .posterior import GatePosterior

EXTRACTION_FILE = "bayesprune_extraction.json"


class TargetError(ValueError):
    """A target that cannot be parsed or cannot be met by this model."""


@dataclass(frozen=True)
class Target:
    kind: str  # "layers", "fraction", "parameters" or "bytes"
    value: float

    @classmethod
    def parse(cls, text: str | float | int) -> "Target":
        s = str(text).strip().replace(" ", "").replace("_", "").upper()
        scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}
        if m := re.fullmatch(r"(\d+)(LAYERS?|BLOCKS?)", s):
            target = cls("layers", int(m[1]))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
            target = cls("fraction", float(m[1]) / 100)
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMG])B", s):
            target = cls("bytes", float(m[1]) * scale[m[2]])
        elif m := re.fullmatch(r"0*\.\d+|0|1(?:\.0*)?", s):
            target = cls("fraction", float(m[0]))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", s):
            target = cls("parameters", float(m[1]) * scale[m[2]])
        else:
            raise TargetError(
                f"cannot read target {text!r}: use a fraction (0.5 or 50%), blocks (12layers), "
                f"parameters (80M, 1.2B) or a size (300MB)")
        if target.value <= 0:
            raise TargetError(f"target {text!r} keeps nothing")
        if target.kind == "fraction" and target.value > 1:
            raise TargetError(f"target {text!r} is more than the whole model")
        return target

    def __str__(self) -> str:
        return {"layers": f"{int(self.value)} layers", "fraction": f"{self.value:.4g} of decoder parameters",
                "parameters": f"{self.value:,.0f} parameters", "bytes": f"{self.value / 1e6:,.1f} MB"}[self.kind]


def choose_layers(model: nn.Module, posterior: GatePosterior, target: Target | str | float) -> list[int]:
    """Indices of the blocks to keep (in model order) for ``target``; raises TargetError if none fit."""
    target = target if isinstance(target, Target) else Target.parse(target)
    layers = decoder_layers(model)
    n = len(layers)
    if len(posterior.layer_names) != n:
        raise TargetError(f"the posterior has {len(posterior.layer_names)} layers, the model {n}")
    block_params = [count_parameters(b) for b in layers]
    block_bytes = [count_bytes(b) for b in layers]
    total_params, total_bytes = count_parameters(model), count_bytes(model)
    decoder = sum(block_params)
    order = posterior.ranking()  # most likely kept first

    def size(keep: list[int]) -> dict:
        gone = [i for i in range(n) if i not in keep]
        params = total_params - sum(block_params[i] for i in gone)
        return {"layers": len(keep), "fraction": (decoder - sum(block_params[i] for i in gone)) / decoder,
                "parameters": params, "bytes": total_bytes - sum(block_bytes[i] for i in gone)}[target.kind]

    if target.kind == "layers" and not 1 <= target.value <= n:
        raise TargetError(f"target {target} is impossible: the model has {n} blocks and at least one must stay")
    for k in range(n, 0, -1):
        keep = sorted(order[:k])
        if size(keep) <= target.value * (1 + 1e-9):
            return keep
    smallest = size(sorted(order[:1]))
    raise TargetError(f"target {target} is below the smallest sub-network with one block "
                      f"({smallest:,.4g} in the same unit)")


def extract_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy of ``model`` with only the blocks ``keep``, renumbered, and its config rewritten."""
    arch = architecture_of(model)
    n = len(decoder_layers(model))
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n for i in keep):
        raise TargetError(f"blocks to keep must be distinct indices in [0, {n}), got {keep}")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise TargetError("this GPT-2 config scales attention by layer index; removing blocks would change it")
    keep = sorted(keep)
    small = copy.deepcopy(model)
    old = decoder_layers(small)
    new = nn.ModuleList([old[i] for i in keep])
    for index, block in enumerate(new):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    parent_path, _, attr = arch.layers.rpartition(".")
    parent = small.get_submodule(parent_path)
    setattr(parent, attr, new)
    config = small.config
    for field in arch.per_layer_fields:
        values = getattr(config, field, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return small


def save_extracted(model: nn.Module, tokenizer, out: str | Path, record: dict, overwrite: bool = False) -> Path:
    """Save model, tokenizer and an extraction record; the folder appears only when complete."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXTRACTION_FILE).write_text(json.dumps(record, indent=2))
    return Path(out)

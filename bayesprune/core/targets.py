"""Target sizes: what a user asks for, and the model totals it is measured against.

Targets: ``"12layers"`` (blocks kept, full width), ``0.5`` or ``"50%"`` (fraction
of decoder parameters kept), ``"80M"`` / ``"1.2B"`` / ``"80000000"`` (parameters
of the whole model), ``"300MB"`` (weight bytes, MB = 10⁶ bytes, at the model's
dtype), ``"40%flops"`` / ``"0.4flops"`` (fraction of the decoder's forward FLOPs per
token at a context of :data:`~bayesprune.core.sizes.FLOP_CONTEXT` tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .architectures import count_bytes, count_parameters, decoder_layers


class TargetError(ValueError):
    """A target that cannot be parsed or cannot be met by this model."""


@dataclass(frozen=True)
class Target:
    kind: str  # "layers", "fraction", "flops" (a fraction of decoder FLOPs), "parameters" or "bytes"
    value: float

    @classmethod
    def parse(cls, text: str | float | int) -> "Target":
        s = str(text).strip().replace(" ", "").replace("_", "").upper()
        scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}
        if m := re.fullmatch(r"(\d+)(LAYERS?|BLOCKS?)", s):
            target = cls("layers", int(m[1]))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%FLOPS?", s):
            target = cls("flops", float(m[1]) / 100)
        elif m := re.fullmatch(r"(0*\.\d+|0|1(?:\.0*)?)FLOPS?", s):
            target = cls("flops", float(m[1]))
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", s):
            target = cls("fraction", float(m[1]) / 100)
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMG])B", s):
            target = cls("bytes", float(m[1]) * scale[m[2]])
        elif m := re.fullmatch(r"0*\.\d+|0|1(?:\.0*)?", s):
            target = cls("fraction", float(m[0]))
        elif re.fullmatch(r"\d*\.\d+", s):
            raise TargetError(f"target {text!r} is a fraction above 1: a fraction of decoder parameters lies in "
                              f"(0, 1] (0.5 or 50%); a parameter count is a whole number or has a unit (80M, 1.2B)")
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)([KMB]?)", s):
            target = cls("parameters", float(m[1]) * scale[m[2]])
        else:
            raise TargetError(
                f"cannot read target {text!r}: use a fraction (0.5 or 50%), blocks (12layers), "
                f"parameters (80M, 1.2B), a size (300MB) or a FLOP fraction (40%flops)")
        if target.value <= 0:
            raise TargetError(f"target {text!r} keeps nothing")
        if target.kind in ("fraction", "flops") and target.value > 1:
            raise TargetError(f"target {text!r} is more than the whole model")
        return target

    def __str__(self) -> str:
        return {"layers": f"{int(self.value)} layers", "fraction": f"{self.value:.4g} of decoder parameters",
                "parameters": f"{self.value:,.0f} parameters", "bytes": f"{self.value / 1e6:,.1f} MB",
                "flops": f"{self.value:.4g} of decoder FLOPs"}[self.kind]


@dataclass(frozen=True)
class ModelTotals:
    """What a target needs beyond the posterior: parameters outside the decoder blocks, bytes per parameter."""

    outside_parameters: int
    bytes_per_parameter: float

    @classmethod
    def of(cls, model, dtype=None) -> "ModelTotals":
        """``model``'s totals, its bytes counted at ``dtype`` (default: the dtype it holds its weights in)."""
        blocks = sum(count_parameters(b) for b in decoder_layers(model))
        per_parameter = dtype.itemsize if dtype is not None else count_bytes(model) / count_parameters(model)
        return cls(count_parameters(model) - blocks, per_parameter)

    def decoder_fraction(self, target: Target, decoder: float) -> float:
        """The fraction of ``decoder`` parameters (of decoder FLOPs for a FLOP target) ``target`` asks for."""
        wanted = {"fraction": lambda v: v, "flops": lambda v: v,
                  "parameters": lambda v: (v - self.outside_parameters) / decoder,
                  "bytes": lambda v: (v / self.bytes_per_parameter - self.outside_parameters) / decoder,
                  }[target.kind](target.value)
        if wanted <= 0:
            raise TargetError(f"target {target} leaves nothing for the decoder blocks "
                              f"({self.outside_parameters:,} parameters sit outside them)")
        if wanted > 1 + 1e-9:
            raise TargetError(f"target {target} is more than the whole model "
                              f"({decoder + self.outside_parameters:,.0f} parameters)")
        return wanted


def check_feasible(target: Target, config) -> None:
    """Refuse, from the model's config alone (no weights), a target the model cannot meet at all.

    Block counts beyond the model's blocks, and parameter or byte targets above the
    whole model or below what sits outside the blocks. Models whose blocks differ in
    width are checked when the plan is made.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if getattr(config, "is_heterogeneous", False) or target.kind in ("fraction", "flops"):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    blocks = decoder_layers(model)
    if target.kind == "layers":
        if target.value > len(blocks):
            raise TargetError(f"target {target} is more than the model's {len(blocks)} blocks")
        return
    ModelTotals.of(model).decoder_fraction(target, sum(count_parameters(b) for b in blocks))

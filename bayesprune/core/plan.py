"""Extraction plans: which blocks, branches and units of each width kind a sub-network keeps, and its size."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kinds import KINDS, width_kinds


@dataclass
class LayerPlan:
    """What one kept block keeps: ``units[kind]`` the kept units of each width kind (absent or ``None``:
    all of them); ``attn``/``mlp`` False: the branch is removed.

    Amplitudes (posterior means at the plan's cost) scale what kept units write and are
    folded into the output projections: ``amplitudes[kind]`` one per kept unit, in the
    order of ``units[kind]``, and one per branch.
    """

    index: int
    units: dict[str, list[int] | None] = field(default_factory=dict)
    attn: bool = True
    mlp: bool = True
    amplitudes: dict[str, list[float]] = field(default_factory=dict)
    attn_amplitude: float = 1.0
    mlp_amplitude: float = 1.0

    def kept(self, kind: str) -> list[int] | None:
        """The kept units of ``kind`` (``None``: all of them)."""
        return self.units.get(kind)


@dataclass
class ExtractionPlan:
    """The kept blocks in model order, the form, and the size it comes to."""

    layers: list[LayerPlan]
    num_layers: int
    form: str = "per-layer"
    decoder_parameters: float = 0.0
    parameters: float = 0.0
    bytes: float = 0.0
    fraction: float = 1.0
    log_probability: float = 0.0
    flop_fraction: float = 1.0  # of decoder FLOPs per token (sizes.FLOP_CONTEXT tokens of context)
    cost: float | None = None  # the cost the posterior was read at

    @property
    def kept_layers(self) -> list[int]:
        return [layer.index for layer in self.layers]

    def gates(self, kinds: tuple[str, ...], units: dict[str, int]) -> dict[str, torch.Tensor]:
        """The hard gates of this plan for a model gated with ``kinds`` with ``units[kind]`` units per block
        (1 = kept, 0 = removed)."""
        kept = {layer.index: layer for layer in self.layers}
        gates = {}
        for kind in kinds:
            if kind in width_kinds():
                values = torch.zeros(self.num_layers, units[kind])
                for l, layer in kept.items():
                    if getattr(layer, KINDS[kind].branch):
                        chosen = layer.kept(kind)
                        values[l, slice(None) if chosen is None else chosen] = 1
            else:
                values = torch.tensor([float(l in kept and (kind == "block" or getattr(kept[l], kind)))
                                       for l in range(self.num_layers)])
            gates[kind] = values
        return gates

    def fold(self, amplitudes: dict[str, torch.Tensor]) -> "ExtractionPlan":
        """Attach amplitudes to fold on extraction.

        ``attn``/``mlp``: ``(layer,)``; width kinds: ``(layer, unit)``.
        """
        for layer in self.layers:
            l = layer.index
            for kind in width_kinds(amplitudes):
                if layer.kept(kind) is not None:
                    layer.amplitudes[kind] = amplitudes[kind][l, layer.kept(kind)].tolist()
            if "attn" in amplitudes:
                layer.attn_amplitude = float(amplitudes["attn"][l])
            if "mlp" in amplitudes:
                layer.mlp_amplitude = float(amplitudes["mlp"][l])
        return self

    def record(self) -> dict:
        """A JSON-able description, written next to the extracted checkpoint."""
        return {"form": self.form, "kept_layers": self.kept_layers,
                "removed_layers": [i for i in range(self.num_layers) if i not in self.kept_layers],
                "layers": [{"index": l.index, "attn": l.attn, "mlp": l.mlp,
                            **{KINDS[k].plural: v for k, v in l.units.items()}} for l in self.layers],
                "decoder_parameters": self.decoder_parameters, "parameters": self.parameters,
                "bytes": self.bytes, "fraction_of_decoder": self.fraction,
                "flop_fraction_of_decoder": self.flop_fraction,
                "log_probability": self.log_probability, "cost": self.cost,
                "amplitudes_folded": any(l.amplitudes or l.attn_amplitude != 1 or l.mlp_amplitude != 1
                                         for l in self.layers)}

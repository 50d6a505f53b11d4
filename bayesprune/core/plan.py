"""Extraction plans: which blocks, branches, head groups and neurons a sub-network keeps, and its size."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WIDTH_KINDS


@dataclass
class LayerPlan:
    """What one kept block keeps: ``None`` = all heads / neurons; ``attn``/``mlp`` False = branch removed.

    Amplitudes (posterior means at the plan's cost) scale what kept units write and are
    folded into the output projections: one per kept head / neuron, in the order of
    ``heads`` / ``neurons``, and one per branch.
    """

    index: int
    heads: list[int] | None = None
    neurons: list[int] | None = None
    attn: bool = True
    mlp: bool = True
    head_amplitudes: list[float] | None = None
    neuron_amplitudes: list[float] | None = None
    attn_amplitude: float = 1.0
    mlp_amplitude: float = 1.0


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

    def gates(self, kinds: tuple[str, ...], heads: int, neurons: int) -> dict[str, torch.Tensor]:
        """The hard gates of this plan for a model gated with ``kinds`` (1 = kept, 0 = removed)."""
        kept = {layer.index: layer for layer in self.layers}
        gates = {}
        for kind in kinds:
            if kind in WIDTH_KINDS:
                count, branch, field_name = (heads, "attn", "heads") if kind == "head" else (neurons, "mlp", "neurons")
                values = torch.zeros(self.num_layers, count)
                for l, layer in kept.items():
                    if getattr(layer, branch):
                        units = getattr(layer, field_name)
                        values[l, slice(None) if units is None else units] = 1
            else:
                values = torch.tensor([float(l in kept and (kind == "block" or getattr(kept[l], kind)))
                                       for l in range(self.num_layers)])
            gates[kind] = values
        return gates

    def fold(self, amplitudes: dict[str, torch.Tensor]) -> "ExtractionPlan":
        """Attach amplitudes to fold on extraction.

        ``attn``/``mlp``: ``(layer,)``; ``head``/``neuron``: ``(layer, unit)``.
        """
        for layer in self.layers:
            l = layer.index
            if "head" in amplitudes and layer.heads is not None:
                layer.head_amplitudes = amplitudes["head"][l, layer.heads].tolist()
            if "neuron" in amplitudes and layer.neurons is not None:
                layer.neuron_amplitudes = amplitudes["neuron"][l, layer.neurons].tolist()
            if "attn" in amplitudes:
                layer.attn_amplitude = float(amplitudes["attn"][l])
            if "mlp" in amplitudes:
                layer.mlp_amplitude = float(amplitudes["mlp"][l])
        return self

    def record(self) -> dict:
        """A JSON-able description, written next to the extracted checkpoint."""
        return {"form": self.form, "kept_layers": self.kept_layers,
                "removed_layers": [i for i in range(self.num_layers) if i not in self.kept_layers],
                "layers": [{"index": l.index, "heads": l.heads,
                            "neurons": None if l.neurons is None else len(l.neurons),
                            "attn": l.attn, "mlp": l.mlp} for l in self.layers],
                "decoder_parameters": self.decoder_parameters, "parameters": self.parameters,
                "bytes": self.bytes, "fraction_of_decoder": self.fraction,
                "flop_fraction_of_decoder": self.flop_fraction,
                "log_probability": self.log_probability, "cost": self.cost,
                "amplitudes_folded": any(l.head_amplitudes is not None or l.neuron_amplitudes is not None
                                         or l.attn_amplitude != 1 or l.mlp_amplitude != 1 for l in self.layers)}

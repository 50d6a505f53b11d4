"""What every unit costs: parameters (and FLOPs per token) of each part of each decoder block.

One :class:`UnitSizes` per gated model, read from its real weights. A block has
``other`` parameters (its norms), a fixed ``attn`` / ``mlp`` part (what a branch
keeps whatever its width: output biases …), ``head`` parameters per key/value head
group and ``neuron`` parameters per FFN neuron, ``heads`` groups and ``neurons``
neurons. A unit counts only when every unit above it is on (block → branch →
head / neuron), so :meth:`UnitSizes.kept_parameters` is multilinear in the gates:
with independent gates its value at the inclusion probabilities is the expected
kept size, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

FLOP_CONTEXT = 1024  # tokens of context a FLOP target assumes (attention scores and mixing)


@dataclass(frozen=True)
class UnitSizes:
    """Per-layer sizes of a model's prunable parts, ``(layer,)`` float64 tensors each."""

    other: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    head: torch.Tensor
    neuron: torch.Tensor
    heads: torch.Tensor
    neurons: torch.Tensor
    head_features: torch.Tensor  # query features per head group (queries per group × head_dim)

    @property
    def num_layers(self) -> int:
        return self.other.shape[0]

    def kept_parameters(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder parameters whose units are on; a missing kind counts as always on.

        Gates are ``(..., layer)`` for block / attn / mlp and ``(..., layer, unit)``
        for head / neuron, with any leading draw dimensions.
        """
        one = torch.ones((), dtype=torch.float64)
        heads = gates["head"].double().sum(-1) if "head" in gates else self.heads
        neurons = gates["neuron"].double().sum(-1) if "neuron" in gates else self.neurons
        attn = gates.get("attn", one).double() * (self.attn + self.head * heads)
        mlp = gates.get("mlp", one).double() * (self.mlp + self.neuron * neurons)
        return (gates.get("block", one).double() * (self.other + attn + mlp)).sum(-1)

    @property
    def decoder_parameters(self) -> float:
        """Every decoder block's parameters."""
        return float(self.kept_parameters({}))

    def kept_fraction(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """C(z): the fraction of decoder parameters the gates keep."""
        return self.kept_parameters(gates) / self.decoder_parameters

    def layer_parameters(self, layer: int, heads: int, neurons: int, attn: bool = True, mlp: bool = True) -> float:
        """Parameters of one block keeping ``heads`` groups and ``neurons`` neurons."""
        size = self.other[layer]
        if attn:
            size = size + self.attn[layer] + heads * self.head[layer]
        if mlp:
            size = size + self.mlp[layer] + neurons * self.neuron[layer]
        return float(size)

    def flops(self, context: int = FLOP_CONTEXT) -> "UnitSizes":
        """The same parts counted in forward FLOPs per token: 2 per weight, and for every head
        group 4 · context · its query features (attention scores and the weighted sum of values)."""
        return replace(self, other=2 * self.other, attn=2 * self.attn, mlp=2 * self.mlp,
                       head=2 * self.head + 4 * context * self.head_features, neuron=2 * self.neuron)

    def to(self, device) -> "UnitSizes":
        """The same sizes on ``device`` (float64 kept: the sums of many units stay exact)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def to_tensors(self, prefix: str = "sizes.") -> dict[str, torch.Tensor]:
        return {prefix + f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "sizes.") -> "UnitSizes":
        return cls(**{f.name: tensors[prefix + f.name].double() for f in fields(cls)})

"""What every unit costs: parameters (and FLOPs per token) of each part of each decoder block.

One :class:`UnitSizes` per gated model, read from its real weights. A block has
``other`` parameters (its norms), a fixed ``attn`` / ``mlp`` part (what a branch
keeps whatever its width: output biases …) and, for every width kind
(:mod:`bayesprune.core.kinds`), its units' parameters and count. A unit counts only
when every unit above it is on (block → branch → head / neuron), so :meth:`UnitSizes.kept_parameters` is multilinear in the gates:
with independent gates its value at the inclusion probabilities is the expected
kept size, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .architectures import Architecture, Widths, architecture_of, decoder_layers, widths_of
from .kinds import BRANCHES, KINDS, branch_kind, width_kinds

FLOP_CONTEXT = 1024  # tokens of context a FLOP target assumes (attention scores and mixing)


@dataclass(frozen=True)
class UnitSizes:
    """Per-layer sizes of a model's prunable parts, ``(layer,)`` float64 tensors each.

    ``unit``, ``count`` and ``context`` hold, per width kind, the parameters per unit,
    the units per block and the features per unit whose FLOPs grow with the context.
    """

    other: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    unit: dict[str, torch.Tensor]
    count: dict[str, torch.Tensor]
    context: dict[str, torch.Tensor]

    @property
    def num_layers(self) -> int:
        return self.other.shape[0]

    def _branch(self, branch: str, kept: dict) -> torch.Tensor:
        """Parameters of a branch keeping ``kept[kind]`` units of its width kind (all of them if absent)."""
        kind = branch_kind(kept, branch) or branch_kind(self.unit, branch)
        units = kept[kind] if kind in kept else self.count[kind]
        return getattr(self, branch) + self.unit[kind] * units

    def branch_parameters(self, branch: str, layer: int) -> torch.Tensor:
        """Parameters of a whole branch of block ``layer``."""
        kind = branch_kind(self.unit, branch)
        return getattr(self, branch)[layer] + self.count[kind][layer] * self.unit[kind][layer]

    def kept_parameters(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """Decoder parameters whose units are on; a missing kind counts as always on.

        Gates are ``(..., layer)`` for block and branch kinds and ``(..., layer, unit)``
        for width kinds, with any leading draw dimensions.
        """
        one = torch.ones((), dtype=torch.float64)
        kept = {k: gates[k].double().sum(-1) for k in width_kinds(gates)}
        attn, mlp = (gates.get(b, one).double() * self._branch(b, kept) for b in BRANCHES)
        return (gates.get("block", one).double() * (self.other + attn + mlp)).sum(-1)

    @property
    def decoder_parameters(self) -> float:
        """Every decoder block's parameters."""
        return float(self.kept_parameters({}))

    def kept_fraction(self, gates: dict[str, torch.Tensor]) -> torch.Tensor:
        """C(z): the fraction of decoder parameters the gates keep."""
        return self.kept_parameters(gates) / self.decoder_parameters

    def layer_parameters(self, layer: int, kept: dict[str, int] | None = None, attn: bool = True,
                         mlp: bool = True) -> float:
        """Parameters of one block keeping ``kept[kind]`` units of each width kind named (all of the others)."""
        kept = kept or {}
        size = self.other[layer]
        for branch, on in zip(BRANCHES, (attn, mlp)):
            if on:
                kind = branch_kind(kept, branch) or branch_kind(self.unit, branch)
                units = kept[kind] if kind in kept else self.count[kind][layer]
                size = size + getattr(self, branch)[layer] + units * self.unit[kind][layer]
        return float(size)

    def flops(self, context: int = FLOP_CONTEXT) -> "UnitSizes":
        """The same parts counted in forward FLOPs per token: 2 per weight, and per unit 4 · context · its
        context features (a head group's attention scores and the weighted sum of values)."""
        unit = {k: 2 * v + 4 * context * self.context[k] if k in self.context else 2 * v for k, v in self.unit.items()}
        return replace(self, other=2 * self.other, attn=2 * self.attn, mlp=2 * self.mlp, unit=unit)

    def to(self, device) -> "UnitSizes":
        """The same sizes on ``device`` (float64 kept: the sums of many units stay exact)."""
        return UnitSizes(**{name: {k: v.to(device) for k, v in value.items()} if isinstance(value, dict)
                            else value.to(device) for name, value in self._fields().items()})

    def _fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_tensors(self, prefix: str = "sizes.") -> dict[str, torch.Tensor]:
        tensors = {prefix + name: getattr(self, name) for name in ("other",) + BRANCHES}
        for kind, unit in self.unit.items():
            tensors[prefix + kind] = unit
            tensors[prefix + KINDS[kind].plural] = self.count[kind]
            if kind in self.context:
                tensors[f"{prefix}{kind}_features"] = self.context[kind]
        return tensors

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "sizes.") -> "UnitSizes":
        kinds = [k for k in width_kinds() if prefix + k in tensors]
        return cls(**{name: tensors[prefix + name].double() for name in ("other",) + BRANCHES},
                   unit={k: tensors[prefix + k].double() for k in kinds},
                   count={k: tensors[prefix + KINDS[k].plural].double() for k in kinds},
                   context={k: tensors[f"{prefix}{k}_features"].double() for k in kinds
                            if f"{prefix}{k}_features" in tensors})


def block_sizes(shapes: dict[str, tuple[int, ...]], arch: Architecture, widths: Widths) -> dict:
    """Parameters of one block by part, from its parameter shapes (names relative to the block).

    ``unit`` holds the parameters each unit of every width kind carries (every slice
    it owns); ``attn`` and ``mlp`` what the branch keeps whatever its width (biases of
    output projections …); ``other`` the rest of the block (its norms).
    """
    def numel(shape):
        return float(torch.Size(shape).numel())

    per_unit = {}
    for name in width_kinds():
        kind, count = KINDS[name], KINDS[name].count(widths)
        per_unit[name] = 0.0
        for piece in kind.pieces(arch):
            per_unit[name] += numel(shapes[f"{piece.module}.weight"]) / count
            bias = shapes.get(f"{piece.module}.bias")
            if piece.axis == "out" and bias is not None:
                per_unit[name] += numel(bias) / count
    branch = {part: sum(numel(s) for n, s in shapes.items() if n.startswith(prefix + "."))
              for part, prefix in zip(BRANCHES, (arch.attention, arch.mlp))}
    fixed = {}
    for part in BRANCHES:
        kind = branch_kind(per_unit, part)
        fixed[part] = branch[part] - per_unit[kind] * KINDS[kind].count(widths)
    return {"other": sum(numel(s) for s in shapes.values()) - branch["attn"] - branch["mlp"], **fixed,
            "unit": per_unit}


def unit_sizes(model) -> UnitSizes:
    """:class:`UnitSizes` of a (plain, ungated) model, read from its weights' shapes."""
    arch = architecture_of(model)
    widths = widths_of(model.config, arch)
    rows = [block_sizes({n: tuple(p.shape) for n, p in block.named_parameters()}, arch, widths)
            for block in decoder_layers(model)]

    def column(values) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.float64)

    kinds = width_kinds()
    return UnitSizes(**{part: column(r[part] for r in rows) for part in ("other",) + BRANCHES},
                     unit={k: column(r["unit"][k] for r in rows) for k in kinds},
                     count={k: column(KINDS[k].count(widths) for _ in rows) for k in kinds},
                     context={k: column(KINDS[k].context_features(widths) for _ in rows) for k in kinds
                              if KINDS[k].context_features(widths)})


def unit_norms(model, kinds=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """L2 norm of the weights of every unit, ``(layer, unit)`` per width kind (default: every one the family
    can gate).

    Differentiable in the weights (the model reads it live when
    weights are trained); ``dtype`` is the precision of the sums (default: the weights').
    """
    arch = architecture_of(model)
    widths = widths_of(model.config, arch)
    kinds = [k for k in width_kinds(kinds) if KINDS[k].site(arch) is not None]
    squares = {kind: [] for kind in kinds}
    for block in decoder_layers(model):
        for name in kinds:
            kind = KINDS[name]
            units = kind.count(widths)
            total = 0
            for piece in arch.width:
                if piece.kind != kind.slices:
                    continue
                weight = block.get_submodule(piece.module).weight
                weight = weight.to(dtype) if dtype is not None else weight
                weight = weight.T if arch.transposed else weight  # (out, in)
                per = kind.features(widths, piece)
                if piece.axis == "out":
                    total = total + weight.pow(2).reshape(units, per, -1).sum((1, 2))
                else:
                    total = total + weight.pow(2).reshape(weight.shape[0], units, per).sum((0, 2))
            squares[name].append(total)
    return {kind: torch.stack(rows).sqrt() for kind, rows in squares.items()}

"""Gate kinds: what a gate can switch off, one registry entry each.

Kinds nest in three levels: a ``block`` gate over a whole decoder block, ``branch``
gates over its attention and MLP branches (``attn``, ``mlp``), and ``width`` gates over
the units inside a branch (``head``: a key/value head group with every query head that
reads it; ``neuron``: one FFN hidden unit). A width kind says which branch it sits in,
which weights a unit owns (the :class:`~bayesprune.core.architectures.WidthSlice` rows
of its ``slices`` label, ``group`` of their units per gate), how the uniform form picks
its count, what it costs in FLOPs beyond its weights and what the extracted config says
of a block that keeps fewer. The gates, the sizes, the prior, the chooser, the slicer,
the posterior and the CLI read this table; a new kind is one :func:`register` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .architectures import Architecture, UnsupportedArchitectureError, WidthSlice, Widths, unit_count

LEVELS = ("block", "branch", "width")
BRANCHES = ("attn", "mlp")


def _no_fields(kept: int, widths: Widths, arch: Architecture) -> dict:
    return {}


def _no_context(widths: Widths) -> int:
    return 0


@dataclass(frozen=True)
class GateKind:
    """One kind of gate.

    Width kinds only: ``branch`` is the branch kind they sit in (at most one width kind
    per branch is gated at a time); ``plural`` names many units (size fields, plan
    records); ``fills``: in the uniform form the count is what the budget leaves (many
    small units, rounded to ``multiple``) rather than searched; ``config_fields`` gives
    the extracted config's fields for a block keeping ``kept`` units; ``context_features``
    the features per unit whose FLOPs grow with the context (attention's queries).
    """

    name: str
    level: str
    description: str
    branch: str | None = None
    plural: str = ""
    slices: str = ""
    group: int = 1
    fills: bool = False
    config_fields: Callable[[int, Widths, Architecture], dict] = _no_fields
    context_features: Callable[[Widths], int] = _no_context

    def __post_init__(self):
        if not self.name.isalpha() or not self.name.islower():
            raise ValueError(f"a gate kind's name is one lower-case word (it prefixes Pyro sites), got {self.name!r}")
        if self.level not in LEVELS:
            raise ValueError(f"gate kind {self.name!r}: level must be one of {LEVELS}, got {self.level!r}")
        if self.level == "width" and (self.branch not in BRANCHES or not self.plural or not self.slices
                                      or self.group < 1):
            raise ValueError(f"width kind {self.name!r} needs a branch in {BRANCHES}, a plural, a slices label "
                             f"and a group >= 1")

    @property
    def width(self) -> bool:
        return self.level == "width"

    @property
    def has_amplitude(self) -> bool:
        """Whether its units carry a fitted output amplitude (a whole block's update cannot be folded into weights)."""
        return self.level != "block"

    def count(self, widths: Widths) -> int:
        """Units per block."""
        units = unit_count(widths, self.slices)
        if units % self.group:
            raise ValueError(f"{self.name} gates take {self.group} {self.slices}s at a time; "
                             f"a block has {units}")
        return units // self.group

    def pieces(self, arch: Architecture) -> tuple[WidthSlice, ...]:
        """The weights a unit owns, norms that mix units included."""
        return arch.width_slices(self.slices)

    def site(self, arch: Architecture) -> WidthSlice | None:
        """The module whose input the gates multiply (``None``: this family cannot gate the kind)."""
        return arch.gate_site(self.slices)

    def norms(self, arch: Architecture) -> tuple[WidthSlice, ...]:
        """Norms that mix the units (they average only over the units that are on)."""
        return tuple(s for s in arch.head_norms if s.kind == self.slices)

    def features(self, widths: Widths, piece: WidthSlice) -> int:
        """Features of ``piece`` one unit owns."""
        return self.group * widths.features(piece.per_unit)


KINDS: dict[str, GateKind] = {}


def register(kind: GateKind) -> GateKind:
    """Add a kind to the registry (after the ones there: kinds are listed in registration order)."""
    if kind.name in KINDS:
        raise ValueError(f"gate kind {kind.name!r} is registered already")
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> GateKind:
    if name not in KINDS:
        raise ValueError(f"unknown gate kind {name!r}; known: {list(KINDS)}")
    return KINDS[name]


def width_kinds(names=None) -> tuple[str, ...]:
    """The width kinds among ``names`` (default: every registered one), in registry order."""
    return tuple(k for k, kind in KINDS.items() if kind.width and (names is None or k in names))


def layer_kinds(names=None) -> tuple[str, ...]:
    """The block and branch kinds among ``names`` (default: every registered one), in registry order."""
    return tuple(k for k, kind in KINDS.items() if not kind.width and (names is None or k in names))


def branch_kind(names, branch: str) -> str | None:
    """The width kind among ``names`` that sits in ``branch`` (``None``: none is gated)."""
    return next((k for k in width_kinds(names) if KINDS[k].branch == branch), None)


def check_gateable(arch: Architecture, names) -> None:
    """Refuse width kinds this family's modules cannot hold fewer of."""
    for name in width_kinds(names):
        if KINDS[name].site(arch) is None:
            raise UnsupportedArchitectureError(
                f"{arch.family} models cannot gate {name}s: transformers' {arch.family} modules "
                f"cannot hold fewer of them")


register(GateKind("block", "block", "a decoder block's whole residual update"))
register(GateKind("attn", "branch", "the attention branch of a block"))
register(GateKind("mlp", "branch", "the MLP branch of a block"))
register(GateKind(
    "head", "width", "a key/value head group: the KV head and every query head that reads it",
    branch="attn", plural="heads", slices="head",
    config_fields=lambda kept, widths, arch: {"num_attention_heads": kept * widths.queries_per_head,
                                              "num_key_value_heads": kept},
    context_features=lambda widths: widths.features("query")))
register(GateKind(
    "neuron", "width", "one FFN hidden unit", branch="mlp", plural="neurons", slices="neuron", fills=True,
    config_fields=lambda kept, widths, arch: {arch.neuron_field: kept}))

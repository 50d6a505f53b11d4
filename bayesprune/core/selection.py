"""Selection: from inclusion probabilities and a target (:mod:`bayesprune.core.targets`) to an extraction plan
(:mod:`bayesprune.core.plan`): which blocks, heads and neurons stay.

The largest sub-network that does not exceed the target is chosen.

Units are kept in order of posterior inclusion probability, a unit counting with
its ancestors (``p`` of a neuron = P(block) · P(mlp) · P(neuron)); opening a block
or branch pays for its fixed parts, and units that no longer fit are skipped so
that smaller ones fill the budget. (Ranking by log-odds per parameter, the most
probable mask under the mean-field posterior, removes whole attention layers
first and measured far worse on SmolLM2: see ``docs/extraction.md``.) Each plan
reports the posterior log-probability of its mask.

Two forms:

* ``per-layer``: every block keeps what the posterior says (a branch may go
  entirely); the checkpoint carries ``per_layer_config`` and loads with
  :func:`bayesprune.load_pruned`.
* ``uniform``: every kept block keeps the same number of heads and neurons (its
  most probable ones), and no branch goes alone; the checkpoint loads in plain
  ``transformers``. The counts are the most probable uniform mask that fits.

``multiple`` rounds kept neuron counts to a multiple (8, 16, 64 …) for faster kernels.
"""

from __future__ import annotations

import itertools
import math

import torch

from .config import FORMS
from .kinds import BRANCHES, KINDS, branch_kind, layer_kinds, width_kinds
from .plan import ExtractionPlan, LayerPlan
from .sizes import UnitSizes
from .targets import ModelTotals, Target, TargetError

def _log(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p.double().clamp(1e-9, 1 - 1e-9))


class _Scorer:
    """Inclusion probabilities and sizes in the shape the choosers need.

    ``measure`` is what the budget counts: decoder parameters, or FLOPs per token for
    a FLOP target; plans always report their parameters.
    """

    def __init__(self, sizes: UnitSizes, totals: ModelTotals, p: dict[str, torch.Tensor],
                 unit_p: dict[str, torch.Tensor], keep_p: torch.Tensor, target: Target):
        self.totals = totals
        self.sizes = sizes
        self.measure = sizes.flops() if target.kind == "flops" else sizes
        self.L = sizes.num_layers
        self.counts = {k: int(n[0]) for k, n in sizes.count.items()}  # units per block of every width kind
        ones = torch.ones(self.L, dtype=torch.float64)
        self.p = {k: p.get(k, ones).double() for k in layer_kinds()}
        self.unit_p = {k: v.double() for k, v in unit_p.items()}
        self.gated = set(p) | set(unit_p)
        self.width = width_kinds(self.gated)  # the gated width kinds
        self.keep_p = keep_p.double()
        self.order = torch.argsort(self.keep_p, descending=True, stable=True).tolist()

    def budget(self, target: Target) -> float:
        """The most the measure may count for ``target``."""
        if target.kind in ("fraction", "flops"):
            return target.value * self.measure.decoder_parameters * (1 + 1e-9)
        return self.totals.decoder_fraction(target, self.sizes.decoder_parameters) * self.sizes.decoder_parameters * (1 + 1e-9)

    def finish(self, plan: ExtractionPlan) -> ExtractionPlan:
        decoder = flops = 0.0
        flop_sizes = self.sizes.flops()
        for layer in plan.layers:
            kept = {k: len(v) for k, v in layer.units.items() if v is not None}
            decoder += self.sizes.layer_parameters(layer.index, kept, layer.attn, layer.mlp)
            flops += flop_sizes.layer_parameters(layer.index, kept, layer.attn, layer.mlp)
        plan.decoder_parameters = decoder
        plan.parameters = decoder + self.totals.outside_parameters
        plan.bytes = plan.parameters * self.totals.bytes_per_parameter
        plan.fraction = decoder / self.sizes.decoder_parameters
        plan.flop_fraction = flops / flop_sizes.decoder_parameters
        return plan


def choose_by_probability(sizes: UnitSizes, totals: ModelTotals, layer_p: dict[str, torch.Tensor],
                          unit_p: dict[str, torch.Tensor], keep_p: torch.Tensor, target: Target | str | float,
                          form: str = "per-layer", multiple: int = 1) -> ExtractionPlan:
    """The sub-network of the most probable units given inclusion probabilities directly.

    ``layer_p`` holds ``(layer,)`` probabilities of block / branch gates,
    ``unit_p`` ``(layer, unit)`` ones of width gates, ``keep_p`` the
    probability that each block contributes at all (it orders whole blocks).
    """
    target = target if isinstance(target, Target) else Target.parse(target)
    if form not in FORMS:
        raise TargetError(f"unknown form {form!r}; choose one of {list(FORMS)}")
    if multiple < 1:
        raise TargetError(f"multiple must be >= 1, got {multiple}")
    for kind in width_kinds(unit_p):
        if KINDS[kind].fills and multiple > unit_p[kind].shape[-1]:
            raise TargetError(f"multiple {multiple} is more than the {unit_p[kind].shape[-1]} {KINDS[kind].plural} "
                              f"a block has")
    return _choose(_Scorer(sizes, totals, layer_p, unit_p, keep_p, target), target, form, multiple)


def choose_blocks(scores: torch.Tensor, sizes: UnitSizes, totals: ModelTotals,
                  target: Target | str | float) -> ExtractionPlan:
    """Whole-block removal by any score (higher = keep): the path block-removal baselines share.

    ``sizes`` is :meth:`GatedModel.unit_parameters` of the model; blocks go lowest
    score first until the target fits.
    """
    target = target if isinstance(target, Target) else Target.parse(target)
    ranks = torch.argsort(torch.argsort(scores.double(), stable=True), stable=True).double()
    p = (ranks + 1) / (len(scores) + 1)  # only the order matters
    return _choose(_Scorer(sizes, totals, {"block": p}, {}, p, target), target, "per-layer", 1)


def choose_units(unit_scores: dict[str, torch.Tensor], sizes: UnitSizes, totals: ModelTotals,
                 target: Target | str | float, form: str = "uniform", multiple: int = 1) -> ExtractionPlan:
    """Width-unit removal by any per-unit score (higher = keep): the path width baselines share.

    ``unit_scores`` maps width kinds (``head``, ``neuron``) to ``(layer, unit)`` scores. Scores are
    compared only within a layer and kind (they become within-layer rank quantiles),
    so the uniform form drops about the same share of heads and of neurons everywhere.
    """
    quantiles = {}
    for kind, scores in unit_scores.items():
        ranks = torch.argsort(torch.argsort(scores.double(), dim=-1, stable=True), dim=-1, stable=True).double()
        quantiles[kind] = (ranks + 1) / (scores.shape[-1] + 1)
    keep = torch.ones(sizes.num_layers, dtype=torch.float64)
    return choose_by_probability(sizes, totals, {}, quantiles, keep, target, form, multiple)


def _choose(scorer: _Scorer, target: Target, form: str, multiple: int) -> ExtractionPlan:
    if target.kind == "layers":
        plan = _choose_depth(scorer, int(target.value))
    elif form == "uniform":
        plan = _choose_uniform(scorer, target, multiple)
    else:
        plan = _choose_per_layer(scorer, target, multiple)
    return scorer.finish(plan)


def _choose_depth(scorer: _Scorer, count: int) -> ExtractionPlan:
    if not 1 <= count <= scorer.L:
        raise TargetError(f"target {count} layers is impossible: the model has {scorer.L} blocks "
                          f"and at least one must stay")
    keep = sorted(scorer.order[:count])
    return ExtractionPlan([LayerPlan(i) for i in keep], scorer.L, "uniform")


def _unit_order(scorer: _Scorer, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, units sorted from most to least probable, and their sorted probabilities."""
    sorted_p, order = torch.sort(scorer.unit_p[kind], dim=-1, descending=True, stable=True)
    return order, sorted_p


def _choose_per_layer(scorer: _Scorer, target: Target, multiple: int) -> ExtractionPlan:
    s, L, gated = scorer.measure, scorer.L, scorer.gated
    # Items: (inclusion probability, layer, part, kept unit indices, parameters). A
    # part is a chunk of units of a width kind, a whole branch, or a whole block when
    # nothing inside it is gated.
    items = []
    for kind in scorer.width:
        chunk = multiple if KINDS[kind].fills else 1
        branch_p = scorer.p[KINDS[kind].branch]
        order, sorted_p = _unit_order(scorer, kind)
        for l in range(L):
            for start in range(0, order.shape[1], chunk):
                p = scorer.p["block"][l] * branch_p[l] * sorted_p[l, start:start + chunk]
                size = p.numel() * s.unit[kind][l]
                items.append((float(p.mean()), l, kind, order[l, start:start + chunk].tolist(), float(size)))
    for l in range(L):
        for branch in BRANCHES:
            if branch_kind(gated, branch) is None and branch in gated:
                joint = scorer.p["block"][l] * scorer.p[branch][l]
                items.append((float(joint), l, branch, None, float(s.branch_parameters(branch, l))))
        if not gated & set(BRANCHES) and not scorer.width:
            items.append((float(scorer.p["block"][l]), l, "block", None, s.layer_parameters(l)))
    items.sort(key=lambda item: -item[0])

    def opening(l: int, part: str, layers: set, parts: set) -> float:
        """What the first item of ``part`` in block ``l`` costs beyond itself."""
        cost = 0.0
        if l not in layers and part != "block":
            cost += s.other[l]
            for branch in BRANCHES:  # ungated branches come with the block
                if branch not in gated and branch_kind(gated, branch) is None:
                    cost += s.branch_parameters(branch, l)
        if part in scorer.width and (l, part) not in parts:
            cost += getattr(s, KINDS[part].branch)[l]
        return float(cost)

    budget = scorer.budget(target)
    used, layers, parts, kept = 0.0, set(), set(), {}
    for _, l, part, units, size in items:
        extra = opening(l, part, layers, parts)
        if used + extra + size <= budget:
            used += extra + size
            layers.add(l)
            parts.add((l, part))
            kept.setdefault((l, part), []).extend(units or [])
    if not layers:
        smallest = min(item[4] + opening(item[1], item[2], set(), set()) for item in items)
        unit = "one whole block" if not scorer.width else "the smallest sub-network"
        raise TargetError(f"target {target} is below what this posterior can keep: {unit} needs "
                          f"{smallest:,.0f} decoder parameters ({smallest / s.decoder_parameters:.3g} of them), "
                          f"the target allows {budget:,.0f}")
    plans = []
    for l in sorted(layers):
        plan = LayerPlan(l)
        for branch in BRANCHES:
            kind = branch_kind(gated, branch)
            if kind is not None:
                plan.units[kind] = sorted(kept.get((l, kind), []))
                setattr(plan, branch, bool(plan.units[kind]))
            elif branch in gated:
                setattr(plan, branch, (l, branch) in parts)
        plans.append(plan)
    plan = ExtractionPlan(plans, L, "per-layer")
    plan.log_probability = _log_probability(scorer, plan)
    return plan


def _choose_uniform(scorer: _Scorer, target: Target, multiple: int) -> ExtractionPlan:
    """Search kept-block count × the counts of the searched width kinds (the filling kind, neurons, takes
    what is left, rounded down to ``multiple``).

    The plan that removes the least probable units wins: the smallest maximum
    inclusion probability among the units it drops (ties: the more probable mask).
    """
    s, L = scorer.measure, scorer.L
    filling = [k for k in scorer.width if KINDS[k].fills]
    fill = filling[-1] if filling else None
    searched = [k for k in scorer.width if k != fill]
    budget = scorer.budget(target)
    order = scorer.order
    sorted_logs, orders, lost = {}, {}, {}
    for kind in scorer.width:
        orders[kind], sorted_p = _unit_order(scorer, kind)
        on, off = _log(sorted_p), _log(1 - sorted_p)
        zero = torch.zeros(L, 1, dtype=torch.float64)
        # log P(keep the n most probable units) for n = 0 … units, per layer
        sorted_logs[kind] = torch.cat([zero, on.cumsum(1)], 1) + off.sum(1, keepdim=True) - \
            torch.cat([zero, off.cumsum(1)], 1)
        # Joint probability of the best unit each kept block would lose, for every count (index n: keep n).
        joint = scorer.p["block"][:, None] * scorer.p[KINDS[kind].branch][:, None] * sorted_p
        lost[kind] = torch.cat([joint, torch.zeros(L, 1, dtype=torch.float64)], 1)
    keep_p = scorer.keep_p
    best, best_key = None, None
    for k in range(1, L + 1):
        keep = sorted(order[:k])
        for values in itertools.product(*(range(1, scorer.counts[kind] + 1) for kind in searched)):
            counts = dict(zip(searched, values))
            if fill is not None:
                fixed = sum(s.layer_parameters(l, counts | {fill: 0}) for l in keep)
                per_unit = float(sum(s.unit[fill][l] for l in keep))
                n = min(scorer.counts[fill], math.floor((budget - fixed) / per_unit))
                if n < scorer.counts[fill]:
                    n -= n % multiple
                if n < 1 or fixed + n * per_unit > budget:
                    continue
                counts[fill] = n
            elif sum(s.layer_parameters(l, counts) for l in keep) > budget:
                continue
            worst = float(keep_p[order[k]]) if k < L else 0.0
            for kind, count in counts.items():
                worst = max(worst, float(lost[kind][keep, count].max()))
            plan = ExtractionPlan([LayerPlan(l) for l in keep], L, "uniform")
            for layer in plan.layers:
                for kind, count in counts.items():
                    layer.units[kind] = sorted(orders[kind][layer.index, :count].tolist())
            plan.log_probability = _log_probability(scorer, plan, sorted_logs, counts)
            key = (-worst, plan.log_probability)
            if best is None or key > best_key:
                best, best_key = plan, key
    if best is None:
        smallest = min(s.layer_parameters(l, {k: 1 for k in searched} | ({fill: min(multiple, scorer.counts[fill])}
                                                                          if fill else {}))
                       for l in range(L))
        raise TargetError(f"target {target} is below the smallest uniform sub-network: one block with "
                          f"one unit of each searched kind and {multiple} of the filling one needs "
                          f"{smallest:,.0f} decoder parameters, the target allows {budget:,.0f}")
    return best


def _log_probability(scorer: _Scorer, plan: ExtractionPlan, sorted_logs: dict | None = None,
                     counts: dict[str, int] | None = None) -> float:
    """Posterior log-probability of the hard mask a plan keeps (mean-field)."""
    kept = {layer.index: layer for layer in plan.layers}
    total = 0.0
    for l in range(scorer.L):
        if "block" in scorer.gated:
            total += float(_log(scorer.p["block"][l] if l in kept else 1 - scorer.p["block"][l]))
        if l not in kept:
            continue
        layer = kept[l]
        for branch in BRANCHES:
            on = getattr(layer, branch)
            if branch in scorer.gated:
                total += float(_log(scorer.p[branch][l] if on else 1 - scorer.p[branch][l]))
            kind = branch_kind(scorer.gated, branch)
            if kind is not None and on:
                if sorted_logs is not None:
                    total += float(sorted_logs[kind][l, counts[kind]])
                else:
                    p = scorer.unit_p[kind][l]
                    mask = torch.zeros_like(p, dtype=torch.bool)
                    mask[layer.kept(kind)] = True
                    total += float(_log(p[mask]).sum() + _log(1 - p[~mask]).sum())
    return total

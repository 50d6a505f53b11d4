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

import math

import torch

from .config import FORMS, WIDTH_KINDS
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
        self.H = int(sizes.heads[0])
        self.N = int(sizes.neurons[0])
        ones = torch.ones(self.L, dtype=torch.float64)
        self.p = {k: p.get(k, ones).double() for k in ("block", "attn", "mlp")}
        self.unit_p = {k: v.double() for k, v in unit_p.items()}
        self.gated = set(p) | set(unit_p)
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
            heads = self.H if layer.heads is None else len(layer.heads)
            neurons = self.N if layer.neurons is None else len(layer.neurons)
            decoder += self.sizes.layer_parameters(layer.index, heads, neurons, layer.attn, layer.mlp)
            flops += flop_sizes.layer_parameters(layer.index, heads, neurons, layer.attn, layer.mlp)
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

    ``layer_p`` holds ``(layer,)`` probabilities of block / attn / mlp gates,
    ``unit_p`` ``(layer, unit)`` ones of head / neuron gates, ``keep_p`` the
    probability that each block contributes at all (it orders whole blocks).
    """
    target = target if isinstance(target, Target) else Target.parse(target)
    if form not in FORMS:
        raise TargetError(f"unknown form {form!r}; choose one of {list(FORMS)}")
    if multiple < 1:
        raise TargetError(f"multiple must be >= 1, got {multiple}")
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
    """Head-group / neuron removal by any per-unit score (higher = keep): the path width baselines share.

    ``unit_scores`` maps ``head`` / ``neuron`` to ``(layer, unit)`` scores. Scores are
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
    pb, pa, pm = scorer.p["block"], scorer.p["attn"], scorer.p["mlp"]
    # Items: (inclusion probability, layer, part, kept unit indices, parameters). A
    # part is a chunk of heads or neurons, a whole branch, or a whole block when
    # nothing inside it is gated.
    items = []
    for kind, branch_p, chunk in (("head", pa, 1), ("neuron", pm, multiple)):
        if kind in gated:
            order, sorted_p = _unit_order(scorer, kind)
            for l in range(L):
                for start in range(0, order.shape[1], chunk):
                    p = pb[l] * branch_p[l] * sorted_p[l, start:start + chunk]
                    size = p.numel() * getattr(s, kind)[l]
                    items.append((float(p.mean()), l, kind, order[l, start:start + chunk].tolist(), float(size)))
    for l in range(L):
        for branch, kind, p in (("attn", "head", pa), ("mlp", "neuron", pm)):
            if kind not in gated and branch in gated:
                size = getattr(s, branch)[l] + getattr(s, kind + "s")[l] * getattr(s, kind)[l]
                joint = pb[l] * p[l]
                items.append((float(joint), l, branch, None, float(size)))
        if not gated & {"attn", "mlp", "head", "neuron"}:
            size = s.layer_parameters(l, scorer.H, scorer.N)
            items.append((float(pb[l]), l, "block", None, size))
    items.sort(key=lambda item: -item[0])

    def opening(l: int, part: str, layers: set, parts: set) -> float:
        """What the first item of ``part`` in block ``l`` costs beyond itself."""
        cost = 0.0
        if l not in layers and part != "block":
            cost += s.other[l]
            for branch, kind in (("attn", "head"), ("mlp", "neuron")):
                if branch not in gated and kind not in gated:  # ungated branches come with the block
                    cost += getattr(s, branch)[l] + getattr(s, kind + "s")[l] * getattr(s, kind)[l]
        if part in WIDTH_KINDS and (l, part) not in parts:
            cost += (s.attn if part == "head" else s.mlp)[l]
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
        unit = "one whole block" if not set(gated) & set(WIDTH_KINDS) else "the smallest sub-network"
        raise TargetError(f"target {target} is below what this posterior can keep: {unit} needs "
                          f"{smallest:,.0f} decoder parameters ({smallest / s.decoder_parameters:.3g} of them), "
                          f"the target allows {budget:,.0f}")
    plans = []
    for l in sorted(layers):
        plan = LayerPlan(l)
        for branch, kind, field_name in (("attn", "head", "heads"), ("mlp", "neuron", "neurons")):
            if kind in gated:
                units = sorted(kept.get((l, kind), []))
                setattr(plan, field_name, units)
                setattr(plan, branch, bool(units))
            elif branch in gated:
                setattr(plan, branch, (l, branch) in parts)
        plans.append(plan)
    plan = ExtractionPlan(plans, L, "per-layer")
    plan.log_probability = _log_probability(scorer, plan)
    return plan


def _choose_uniform(scorer: _Scorer, target: Target, multiple: int) -> ExtractionPlan:
    """Search kept-block count × heads per block (neurons per block fill what is left).

    The plan that removes the least probable units wins: the smallest maximum
    inclusion probability among the units it drops (ties: the more probable mask).
    """
    s, L, H, N, gated = scorer.measure, scorer.L, scorer.H, scorer.N, scorer.gated
    budget = scorer.budget(target)
    order = scorer.order
    sorted_logs, orders = {}, {}
    for kind in WIDTH_KINDS:
        if kind in gated:
            orders[kind], sorted_p = _unit_order(scorer, kind)
            on, off = _log(sorted_p), _log(1 - sorted_p)
            zero = torch.zeros(L, 1, dtype=torch.float64)
            # log P(keep the n most probable units) for n = 0 … units, per layer
            sorted_logs[kind] = torch.cat([zero, on.cumsum(1)], 1) + off.sum(1, keepdim=True) - \
                torch.cat([zero, off.cumsum(1)], 1)
    keep_p = scorer.keep_p
    # Joint probability of the best unit each kept block would lose, for every width.
    lost = {}
    for kind, branch in (("head", "attn"), ("neuron", "mlp")):
        if kind in gated:
            _, sorted_p = _unit_order(scorer, kind)
            joint = scorer.p["block"][:, None] * scorer.p[branch][:, None] * sorted_p
            lost[kind] = torch.cat([joint, torch.zeros(L, 1, dtype=torch.float64)], 1)  # index n: keep n
    best, best_key = None, None
    for k in range(1, L + 1):
        keep = sorted(order[:k])
        for h in (range(1, H + 1) if "head" in gated else [H]):
            fixed = sum(s.layer_parameters(l, h, 0) for l in keep)
            per_neuron = float(sum(s.neuron[l] for l in keep))
            n = min(N, math.floor((budget - fixed) / per_neuron)) if "neuron" in gated else N
            if n < N:
                n -= n % multiple
            if n < 1 or fixed + n * per_neuron > budget:
                continue
            worst = float(keep_p[order[k]]) if k < L else 0.0
            if "head" in gated:
                worst = max(worst, float(lost["head"][keep, h].max()))
            if "neuron" in gated:
                worst = max(worst, float(lost["neuron"][keep, n].max()))
            plan = ExtractionPlan([LayerPlan(l) for l in keep], L, "uniform")
            for layer in plan.layers:
                if "head" in gated:
                    layer.heads = sorted(orders["head"][layer.index, :h].tolist())
                if "neuron" in gated:
                    layer.neurons = sorted(orders["neuron"][layer.index, :n].tolist())
            plan.log_probability = _log_probability(scorer, plan, sorted_logs, h, n)
            key = (-worst, plan.log_probability)
            if best is None or key > best_key:
                best, best_key = plan, key
    if best is None:
        smallest = min(s.layer_parameters(l, 1 if "head" in gated else H, min(multiple, N)) for l in range(L))
        raise TargetError(f"target {target} is below the smallest uniform sub-network: one block with "
                          f"one head group and {min(multiple, N)} neurons needs {smallest:,.0f} decoder parameters, "
                          f"the target allows {budget:,.0f}")
    return best


def _log_probability(scorer: _Scorer, plan: ExtractionPlan, sorted_logs: dict | None = None,
                     heads: int | None = None, neurons: int | None = None) -> float:
    """Posterior log-probability of the hard mask a plan keeps (mean-field)."""
    kept = {layer.index: layer for layer in plan.layers}
    total = 0.0
    for l in range(scorer.L):
        if "block" in scorer.gated:
            total += float(_log(scorer.p["block"][l] if l in kept else 1 - scorer.p["block"][l]))
        if l not in kept:
            continue
        layer = kept[l]
        for branch, kind, units, count in (("attn", "head", layer.heads, heads),
                                           ("mlp", "neuron", layer.neurons, neurons)):
            on = getattr(layer, branch)
            if branch in scorer.gated:
                total += float(_log(scorer.p[branch][l] if on else 1 - scorer.p[branch][l]))
            if kind in scorer.gated and on:
                if sorted_logs is not None:
                    total += float(sorted_logs[kind][l, count])
                else:
                    p = scorer.unit_p[kind][l]
                    mask = torch.zeros_like(p, dtype=torch.bool)
                    mask[units] = True
                    total += float(_log(p[mask]).sum() + _log(1 - p[~mask]).sum())
    return total

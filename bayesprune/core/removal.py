"""The greedy block-removal engine: each removal judged given the blocks already removed.

Every block-removal search in bayesprune runs here: the conditional depth search
(:func:`conditional_depth_search`, adaptive over windows and optionally restricted by a
posterior), SLEB (the same search scoring NLL on every window at each step), the swap
refinement (:func:`swap_search`) and the single-removal scores that give block gates a
data-driven importance (:func:`removal_scores`: the first step's scores). ShortGPT's
Block Influence needs no removal and stays a one-pass ranking.

A mean-field block posterior gives each block's *marginal* inclusion. Removing two
neighbours can cost far more than removing either alone, and marginals cannot say so.
The search here builds the ranking one removal at a time. With the set ``R`` already
removed, every remaining candidate ``j`` is scored by the likelihood of the hard-gated
network with ``R ∪ {j}`` off: the per-token KL from the dense network (``distillation``)
or the next-token NLL (``nll``), on scoring windows. This is the conditional
``log p(z_j = 1 | z_R = 0, data) − log p(z_j = 0 | z_R = 0, data)`` of the model's
likelihood, per token; the block with the lowest goes next.

A posterior (or any ranking) can restrict each step to the ``candidates`` remaining
blocks it holds least likely to be needed, which cuts the evaluations. The
uncertainty of each choice is measured over the scoring windows: the share of
Bayesian-bootstrap reweightings (flat Dirichlet weights over windows) under which the
chosen block is still the best next removal.

A greedy order need not give the best set of a given size: a block removed early may
be worth restoring once later removals are known. :func:`swap_search` refines a set by
single swaps (one removed block restored, one kept block removed), each judged the
same way, until the set is the best of its neighbourhood.

Some single units break a network when removed alone (an attention-sink head, a
massive-activation neuron): :func:`critical_units` finds the width units whose removal
alone raises the NLL past a threshold, by bisecting groups, so that a fit can start with
them kept.

Every trial here, a set of blocks or a group of units removed, leaves the layers before the first
one it changes as they are in the dense pass: their outputs are recorded once per batch and replayed
(:class:`DensePrefix`), and only the changed layer and those after it are computed, as long as
the records fit in :data:`REPLAY_BUDGET` bytes.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .architectures import decoder_layers
from .config import DEPTH_SCORES
from .gates import GatedInput, GatedModel
from .kinds import width_kinds
from .likelihood import next_token_log_probs, next_token_nll, sequence_kl


@dataclass
class DepthStep:
    """One removal: the block chosen, every candidate's score (nats per token), the choice's probability."""

    removed: int
    scores: dict[int, float]
    choice_probability: float


@dataclass
class DepthSearch:
    """The removal order, first removed first, with what each step saw and what the search cost."""

    order: list[int]
    steps: list[DepthStep] = field(default_factory=list)
    score: str = "distillation"
    tokens: int = 0
    evaluations: int = 0
    seconds: float = 0.0

    def block_scores(self, num_layers: int) -> torch.Tensor:
        """Scores for block selection (higher = keep): the ``k``-th removed scores ``k``, the rest ``num_layers``."""
        scores = torch.full((num_layers,), float(num_layers))
        for k, layer in enumerate(self.order):
            scores[layer] = k
        return scores

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "DepthSearch":
        steps = [DepthStep(s["removed"], {int(k): v for k, v in s["scores"].items()}, s["choice_probability"])
                 for s in record["steps"]]
        return cls(list(record["order"]), steps, record["score"], record["tokens"], record["evaluations"],
                   record["seconds"])


REPLAY_BUDGET = 2 * 2**30  # bytes of recorded layer outputs a search may hold; past them it runs whole passes


def replay_affordable(gated: GatedModel, windows: torch.Tensor) -> bool:
    """Whether every decoder layer's output on all of ``windows`` fits in :data:`REPLAY_BUDGET` bytes."""
    hidden = gated.model.config.get_text_config().hidden_size
    element = next(gated.model.parameters()).element_size()
    return windows.numel() * hidden * gated.num_layers * element <= REPLAY_BUDGET


class DensePrefix:
    """The outputs of every decoder layer of the network as its gates are set now, on one batch, recorded so
    that a network changed only from layer ``l`` on computes layers ``l`` and after: the layers before ``l``
    return their recorded outputs (copies, the same numbers as computing them) in place of running. With
    ``record`` false nothing is kept and every pass is whole."""

    def __init__(self, gated: GatedModel, batch: torch.Tensor, record: bool = True):
        self.gated, self.batch = gated, batch.to(next(gated.model.parameters()).device)
        self.layers, self.outputs = decoder_layers(gated.model), []
        hooks = [layer.register_forward_hook(lambda module, args, output: self.outputs.append(output))
                 for layer in self.layers] if record else []
        try:
            self.logits = gated(input_ids=self.batch, use_cache=False).logits
        finally:
            for hook in hooks:
                hook.remove()

    def logits_from(self, layer: int) -> torch.Tensor:
        """Logits under the gates set now, which must leave every layer before ``layer`` as it was recorded."""
        replayed = self.layers[:layer] if self.outputs else []
        own = [module.__dict__.get("forward") for module in replayed]  # a forward set on the instance (hooks)
        for module, output in zip(replayed, self.outputs):
            module.forward = functools.partial(_recorded, output)
        try:
            return self.gated(input_ids=self.batch, use_cache=False).logits
        finally:
            for module, forward in zip(replayed, own):
                del module.forward
                if forward is not None:
                    module.forward = forward


def _recorded(output, *args, **kwargs):
    """A replayed layer's output: a copy, so that nothing after it can change the record in place."""
    if isinstance(output, tuple):
        return tuple(_recorded(o) for o in output)
    return output.clone() if isinstance(output, torch.Tensor) else output


class BlockScorer:
    """Per-window score (nats per predicted token) of the gated network under hard block gates; each batch's
    pass runs from the first block the gates change (:class:`DensePrefix`, recorded on first use, if
    ``replay``)."""

    def __init__(self, gated: GatedModel, windows: torch.Tensor, score: str, batch_size: int, replay: bool = True):
        if score not in DEPTH_SCORES:
            raise ValueError(f"the depth score must be one of {DEPTH_SCORES}, not {score!r}")
        self.gated, self.score, self.batch_size, self.replay = gated, score, batch_size, replay
        self.batches = [windows[i:i + batch_size] for i in range(0, windows.shape[0], batch_size)]
        self.prefixes: list[DensePrefix | None] = [None] * len(self.batches)
        self.per_window = windows.shape[1] - 1
        self.teacher = None
        if score == "distillation":
            self.teacher = [next_token_log_probs(self._prefix(i).logits) for i in range(len(self.batches))]

    def _prefix(self, index: int) -> DensePrefix:
        if self.prefixes[index] is None:
            with self.gated.gates_set({"block": torch.ones(self.gated.num_layers)}):
                self.prefixes[index] = DensePrefix(self.gated, self.batches[index], self.replay)
        return self.prefixes[index]

    def __call__(self, on: torch.Tensor) -> torch.Tensor:
        changed = torch.nonzero(on != 1).flatten()
        first = int(changed[0]) if changed.numel() else self.gated.num_layers
        values = []
        with self.gated.gates_set({"block": on}):
            for index in range(len(self.batches)):
                prefix = self._prefix(index)
                logits = prefix.logits_from(first)
                values.append(next_token_nll(logits, prefix.batch) if self.teacher is None
                              else sequence_kl(self.teacher[index], logits))
        return torch.cat(values) / self.per_window


def win_shares(per_window: dict[int, torch.Tensor], draws: int = 2000, seed: int = 0) -> dict[int, float]:
    """Per candidate: the share of flat-Dirichlet reweightings of the windows under which its mean score is lowest."""
    blocks = list(per_window)
    values = torch.stack([per_window[b] for b in blocks]).double()  # (candidate, window)
    weights = torch.distributions.Dirichlet(torch.ones(values.shape[1], dtype=torch.float64))
    best = _seeded(weights, draws, seed) @ values.T
    counts = torch.bincount(best.argmin(-1), minlength=len(blocks)).double() / draws
    return dict(zip(blocks, counts.tolist()))


def _seeded(weights: torch.distributions.Dirichlet, draws: int, seed: int) -> torch.Tensor:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return weights.sample((draws,))
    finally:
        torch.random.set_rng_state(state)


@torch.no_grad()
def removal_scores(gated: GatedModel, windows: torch.Tensor, score: str = "nll", batch_size: int = 4) -> torch.Tensor:
    """Per block: how much the score per token on ``windows`` rises when that block alone is removed (every
    other gate open): a greedy search's first step, on every window."""
    if "block" not in gated.kinds:
        raise ValueError("removal scores need a model gated with block gates (GateConfig(units=('block', ...)))")
    scorer = BlockScorer(gated, windows, score, batch_size, replay_affordable(gated, windows))
    on = torch.ones(gated.num_layers)
    dense = scorer(on).mean()
    return torch.stack([scorer(_without(on, [b])).mean() - dense for b in range(gated.num_layers)])


@torch.no_grad()
def conditional_depth_search(gated: GatedModel, windows: torch.Tensor, removals: int, score: str = "nll",
                             proposal: torch.Tensor | None = None, candidates: int | None = None,
                             chunk: int = 8, confidence: float = 0.95, batch_size: int = 4,
                             protected: tuple[int, ...] = (), progress: bool = True) -> DepthSearch:
    """Remove ``removals`` blocks one at a time, each the best given those already removed.

    Every candidate is scored on the first ``chunk`` windows. While the choice's
    probability is below ``confidence`` and windows are left, the contenders (those
    that win under at least 1 % of the reweightings) are scored on the next ``chunk``
    and the choice is made again over all the windows they have seen: data is spent
    where the ranking is uncertain. ``proposal`` (per block, higher = keep: a
    posterior's block inclusion, or any ranking) with ``candidates`` limits each step
    to that many of the remaining blocks it ranks lowest. ``protected`` blocks are never
    removed. The gated model needs block gates; its gates are left as they were.
    """
    if "block" not in gated.kinds:
        raise ValueError("a depth search needs a model gated with block gates (GateConfig(units=('block', ...)))")
    num_layers = gated.num_layers
    protected = sorted({int(b) for b in protected})
    if any(not 0 <= b < num_layers for b in protected):
        raise ValueError(f"protected blocks must be some of 0..{num_layers - 1}, not {protected}")
    most = num_layers - max(1, len(protected))
    if not 0 <= removals <= most:
        raise ValueError(f"removals must be in [0, {most}] ({num_layers} blocks, {len(protected)} protected), "
                         f"got {removals}")
    if candidates is not None and (candidates < 1 or proposal is None):
        raise ValueError("candidates needs a proposal ranking and must be at least 1")
    if chunk < 2 or not 0 < confidence <= 1:
        raise ValueError(f"chunk must be >= 2 windows and confidence in (0, 1], got {chunk} and {confidence}")
    started = time.time()
    scorers = _scorers(gated, windows, score, chunk, batch_size)
    search = DepthSearch([], score=score)
    chunks = 0
    on = torch.ones(num_layers)
    for _ in tqdm(range(removals), desc="depth search", disable=not progress):
        remaining = [b for b in torch.nonzero(on).flatten().tolist() if b not in protected]
        if candidates is not None:
            remaining = sorted(remaining, key=lambda b: float(proposal[b]))[:candidates]
        choice = _adaptive_choice(scorers, {b: _without(on, [b]) for b in remaining}, confidence)
        on[choice.best] = 0
        search.order.append(choice.best)
        search.steps.append(DepthStep(choice.best, choice.means, choice.probability))
        search.evaluations += choice.evaluations
        chunks = max(chunks, choice.chunks)
    search.tokens = min(chunks * chunk, windows.shape[0]) * windows.shape[1]
    search.seconds = time.time() - started
    return search


@dataclass
class SwapStep:
    """One accepted swap: a removed block brought back, a kept one removed, and what the choice saw."""

    restored: int
    removed: int
    score: float
    before: float
    choice_probability: float


@dataclass
class SwapSearch:
    """A removed set refined by single swaps until none is better (or ``max_swaps`` were made)."""

    removed: list[int]
    start: list[int]
    steps: list[SwapStep] = field(default_factory=list)
    local_optimum: bool = False
    score: str = "nll"
    tokens: int = 0
    evaluations: int = 0
    seconds: float = 0.0

    def record(self) -> dict:
        return asdict(self)


@torch.no_grad()
def swap_search(gated: GatedModel, windows: torch.Tensor, removed, score: str = "nll", max_swaps: int = 8,
                chunk: int = 8, confidence: float = 0.95, batch_size: int = 4, protected: tuple[int, ...] = (),
                progress: bool = True) -> SwapSearch:
    """Refine a set of removed blocks by swaps: each pass scores the set and every set one swap away (a
    removed block restored, a kept one that is not ``protected`` removed) as the depth search scores its
    candidates, on more windows while the choice is unsure (the set itself is scored on every window its
    rivals are), and moves to the best. It stops when the set itself is the best of its neighbourhood (a
    local optimum of the score on these windows) or after ``max_swaps``; a last pass then says whether the
    set it ends on is one."""
    if "block" not in gated.kinds:
        raise ValueError("a swap search needs a model gated with block gates (GateConfig(units=('block', ...)))")
    num_layers = gated.num_layers
    current = sorted({int(b) for b in removed})
    protected = sorted({int(b) for b in protected})
    if not current or any(not 0 <= b < num_layers for b in current) or set(current) & set(protected):
        raise ValueError(f"removed must be some unprotected blocks of 0..{num_layers - 1}, not {list(removed)} "
                         f"(protected: {protected})")
    if chunk < 2 or not 0 < confidence <= 1 or max_swaps < 0:
        raise ValueError(f"chunk must be >= 2 windows, confidence in (0, 1] and max_swaps >= 0, got {chunk}, "
                         f"{confidence} and {max_swaps}")
    started = time.time()
    scorers = _scorers(gated, windows, score, chunk, batch_size)
    search = SwapSearch(list(current), list(current), score=score)
    chunks = 0
    all_on = torch.ones(num_layers)
    for _ in tqdm(range(max_swaps + 1), desc="swap search", disable=not progress):
        kept = [b for b in range(num_layers) if b not in current and b not in protected]
        trials = {(None, None): _without(all_on, current)}
        trials.update({(out, into): _without(all_on, [b for b in current if b != out] + [into])
                       for out in current for into in kept})
        choice = _adaptive_choice(scorers, trials, confidence, keep=(None, None))
        search.evaluations += choice.evaluations
        chunks = max(chunks, choice.chunks)
        if choice.best == (None, None):
            search.local_optimum = True
            break
        if len(search.steps) == max_swaps:
            break
        out, into = choice.best
        current = sorted([b for b in current if b != out] + [into])
        search.steps.append(SwapStep(out, into, choice.means[choice.best], choice.means[None, None],
                                     choice.probability))
    search.removed = current
    search.tokens = min(chunks * chunk, windows.shape[0]) * windows.shape[1]
    search.seconds = time.time() - started
    return search


def _scorers(gated: GatedModel, windows: torch.Tensor, score: str, chunk: int, batch_size: int) -> list[BlockScorer]:
    replay = replay_affordable(gated, windows)
    return [BlockScorer(gated, windows[i:i + chunk], score, batch_size, replay)
            for i in range(0, windows.shape[0], chunk)]


def _without(on: torch.Tensor, blocks) -> torch.Tensor:
    trial = on.clone()
    trial[list(blocks)] = 0
    return trial


@dataclass
class _Choice:
    best: object
    means: dict
    probability: float
    evaluations: int
    chunks: int


def _adaptive_choice(scorers: list[BlockScorer], trials: dict, confidence: float, keep=None) -> _Choice:
    """The trial (block gates) with the lowest mean score. Every trial is scored on the first chunk of
    windows; while the best one's probability is below ``confidence`` and chunks are left, the contenders
    (those that win under at least 1 % of the reweightings) are scored on the next chunk and the choice is
    made again over all the windows they have seen. The trial ``keep`` stays a contender throughout."""
    remaining, per_window, evaluations, used = list(trials), {}, 0, 0
    for used, scorer in enumerate(scorers, 1):
        for name in remaining:
            part = scorer(trials[name])
            per_window[name] = part if name not in per_window else torch.cat([per_window[name], part])
        evaluations += len(remaining)
        per_window = {name: per_window[name] for name in remaining}
        shares = win_shares(per_window)
        if max(shares.values()) >= confidence:
            break
        remaining = [name for name, share in shares.items() if share >= 0.01 or name == keep]
    per_window = {name: per_window[name] for name in remaining}
    means = {name: float(v.mean()) for name, v in per_window.items()}
    best = min(means, key=means.get)
    return _Choice(best, means, win_shares(per_window)[best], evaluations, used)


def _mean_nll(logits: torch.Tensor, windows: torch.Tensor) -> float:
    return next_token_nll(logits, windows).sum().item() / (windows.shape[0] * (windows.shape[1] - 1))


@torch.no_grad()
def critical_units(gated: GatedModel, windows: torch.Tensor, threshold: float,
                   candidates: int = 16) -> dict[str, torch.Tensor]:
    """Per width kind, a ``(layer, unit)`` mask of the units whose removal alone (every other gate open) raises
    the mean NLL per token on ``windows`` (one batch) by more than ``threshold``.

    In each layer the ``candidates`` units with the largest input magnitude into the gated projection are
    searched (all of them if the layer has no more): the group is removed at once and, if the rise passes the
    threshold, split in halves, down to single units. A unit a group's removal hides (another unit in the
    group making up for it) is not found; the scan costs a few forward passes per layer, each from that
    layer on (:class:`DensePrefix`).
    """
    with gated.gates_set({}):
        prefix = DensePrefix(gated, windows, replay_affordable(gated, windows))
    dense = _mean_nll(prefix.logits, prefix.batch)

    def scorer(gates: dict[str, torch.Tensor], layer: int) -> float:
        with gated.gates_set(gates):
            return _mean_nll(prefix.logits_from(layer), prefix.batch)

    magnitude = input_magnitudes(gated, windows)
    found = {}
    for kind in width_kinds(gated.kinds):
        shape = gated.values.shape(kind)
        mask = torch.zeros(shape, dtype=torch.bool)
        for layer in range(shape[0]):
            groups = [magnitude[kind][layer].topk(min(candidates, shape[1])).indices.tolist()]
            while groups:
                group = groups.pop()
                off = torch.ones(shape)
                off[layer, group] = 0
                if scorer({kind: off}, layer) - dense <= threshold:
                    continue
                if len(group) == 1:
                    mask[layer, group[0]] = True
                else:
                    groups += [group[:len(group) // 2], group[len(group) // 2:]]
        found[kind] = mask
    return found


@torch.no_grad()
def input_magnitudes(gated: GatedModel, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per width kind, ``(layer, unit)``: the largest absolute input any of a unit's features feeds its gated
    projection over ``windows`` (dense network)."""
    found: dict[str, dict[int, torch.Tensor]] = {k: {} for k in width_kinds(gated.kinds)}
    hooks = []
    for module in gated.model.modules():
        if isinstance(module, GatedInput):
            def record(wrapper, args, kwargs, found=found):
                x = args[0].detach().abs().flatten(0, -2).amax(0).float()
                found[wrapper.kind][wrapper.index] = x.reshape(-1, wrapper.features).amax(-1).cpu()
            hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        gated(input_ids=windows.to(next(gated.model.parameters()).device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {kind: torch.stack([layers[i] for i in range(gated.num_layers)]) for kind, layers in found.items()}


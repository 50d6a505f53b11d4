"""A depth ranking re-scored conditionally: each removal is judged given the blocks already removed.

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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from .config import DEPTH_SCORES
from .evaluate import next_token_nll
from .gates import GatedModel
from .likelihood import next_token_log_probs, sequence_kl


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


class _WindowScorer:
    """Per-window score (nats per predicted token) of the gated network under hard block gates."""

    def __init__(self, gated: GatedModel, windows: torch.Tensor, score: str, batch_size: int):
        if score not in DEPTH_SCORES:
            raise ValueError(f"the depth score must be one of {DEPTH_SCORES}, not {score!r}")
        self.gated, self.score, self.batch_size = gated, score, batch_size
        device = next(gated.model.parameters()).device
        self.batches = [windows[i:i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]
        self.per_window = windows.shape[1] - 1
        self.teacher = None
        if score == "distillation":
            with gated.gates_set({"block": torch.ones(gated.num_layers)}):
                self.teacher = [next_token_log_probs(self._logits(batch)) for batch in self.batches]

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.gated(input_ids=batch, use_cache=False).logits

    def __call__(self, on: torch.Tensor) -> torch.Tensor:
        values = []
        with self.gated.gates_set({"block": on}):
            for index, batch in enumerate(self.batches):
                logits = self._logits(batch)
                values.append(next_token_nll(logits, batch) if self.teacher is None
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
    scorers = [_WindowScorer(gated, windows[i:i + chunk], score, batch_size)
               for i in range(0, windows.shape[0], chunk)]
    search = DepthSearch([], score=score)
    seen = 0
    on = torch.ones(num_layers)
    for _ in tqdm(range(removals), desc="depth search", disable=not progress):
        remaining = [b for b in torch.nonzero(on).flatten().tolist() if b not in protected]
        if candidates is not None:
            remaining = sorted(remaining, key=lambda b: float(proposal[b]))[:candidates]
        per_window: dict[int, torch.Tensor] = {}
        for used, scorer in enumerate(scorers):
            for layer in remaining:
                trial = on.clone()
                trial[layer] = 0
                part = scorer(trial)
                per_window[layer] = part if used == 0 else torch.cat([per_window[layer], part])
            seen = max(seen, (used + 1) * chunk)
            search.evaluations += len(remaining)
            per_window = {b: per_window[b] for b in remaining}
            shares = win_shares(per_window)
            if max(shares.values()) >= confidence:
                break
            remaining = [b for b, share in shares.items() if share >= 0.01]
        per_window = {b: per_window[b] for b in remaining}
        means = {b: float(v.mean()) for b, v in per_window.items()}
        chosen = min(means, key=means.get)
        on[chosen] = 0
        search.order.append(chosen)
        search.steps.append(DepthStep(chosen, means, win_shares(per_window)[chosen]))
    search.tokens = min(seen, windows.shape[0]) * windows.shape[1]
    search.seconds = time.time() - started
    return search


def format_depth(search: DepthSearch) -> str:
    """The removal order as a table: step, block, its score and the next best, the choice's probability."""
    lines = [f"{'step':>4}  {'block':>5}  {search.score + ' /token':>16}  {'runner-up':>16}  {'P(best)':>7}"]
    for k, step in enumerate(search.steps, 1):
        ranked = sorted(step.scores.items(), key=lambda item: item[1])
        runner = f"{ranked[1][1]:.4f} (#{ranked[1][0]})" if len(ranked) > 1 else "–"
        lines.append(f"{k:>4}  {step.removed:>5}  {ranked[0][1]:>16.4f}  {runner:>16}  {step.choice_probability:>7.2f}")
    return "\n".join(lines)


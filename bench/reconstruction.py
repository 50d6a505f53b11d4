"""Reconstruction at extraction, in domain and on text the fit never saw.

Reads one fitted run (the README's main job by default: adapters fitted with the gates), plans each
target from its posterior, and cuts the plan four ways: the fitted (adapter-merged) network as
``bayesprune extract`` does, that cut refitted (``--reconstruction``, each of ``--methods``, calibrated on the
run's own fit split) to reproduce the fitted network or the original one, and the original network cut and
refitted to itself. Each is scored on the test split of every domain the project has offline (the run's
own corpus is the in-domain one), beside both dense networks. Writes
``bench/results/reconstruction.json`` and a plot of perplexity per domain.

    .venv/bin/python bench/reconstruction.py --run runs/main     # ≈ 6 min on 2 CPU cores
    .venv/bin/python bench/reconstruction.py --run runs/held-out/kjv-seed0 --methods least-squares bias \
        least-squares+bias --damping 1.0 --targets 0.75 --variants 'fitted cut' 'fitted cut, refit to fitted' \
        'fitted cut, refit to original' --calibration-tokens 4096 --eval-tokens 4096 \
        --out bench/results/reconstruction-bias.json        # a held_out.py fold: ≈ 12 min
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import time
from pathlib import Path

import torch
from common import pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.core.config import RECONSTRUCTIONS, ExtractionConfig
from bayesprune.core.targets import Target
from bayesprune.cut.reconstruction import reconstruct
from bayesprune.inputs.data import DOMAINS, domain_documents, split_corpus, split_documents
from bayesprune.inputs.pretrained import source_dtype
from bayesprune.run.extract_job import calibration_windows, run_plan
from bayesprune.run.rundir import fitted_model_path, load_fitted, load_fitted_model, read_config


STARS = {0.01: "k*", 0.1: "m*", 1.0: "c*"}  # a leave-one-domain-out refit, by damping


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    domains = list(rows[0]["perplexity"])
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3.6))
    for ax, domain in zip(axes, domains):
        for label, damping in sorted({(r["variant"], r.get("damping")) for r in rows if r["target"] != "dense"
                                      and "left_out" not in r}, key=str):
            members = sorted((r for r in rows if (r["variant"], r.get("damping")) == (label, damping)
                              and "left_out" not in r), key=lambda r: r["fraction"])
            ax.plot([r["fraction"] for r in members], [r["perplexity"][domain] for r in members], "o-",
                    label=label + ("" if damping is None else f", damping {damping}"))
        for r in rows:
            if r.get("left_out") == domain:
                marker = STARS.get(r.get("damping"), "k*")
                ax.plot(r["fraction"], r["perplexity"][domain], marker, ms=9,
                        label="refit on the other domains" + (f", damping {r['damping']}" if "damping" in r else ""))
        for r, style in zip((r for r in rows if r["target"] == "dense"), (":", "--")):
            ax.axhline(r["perplexity"][domain], color="k", ls=style, lw=0.8, label=f"dense ({r['variant']})")
        ax.set(title=domain, xlabel="fraction kept", yscale="log")
    axes[0].set_ylabel("test perplexity (log scale)")
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


VARIANTS = {  # label: (weights cut, reference the kept columns are refitted to; None: no refit)
    "fitted cut": ("fitted", None),
    "fitted cut, refit to fitted": ("fitted", "fitted"),
    "fitted cut, refit to original": ("fitted", "original"),
    "original cut, refit to original": ("original", "original"),
}


def leave_one_domain_out(fitted, plan, target: str, tokenizer, fitted_on: list[str], seq_len: int, args,
                         score) -> list:
    """The fitted cut refitted on the other domains' fit splits, once per domain the fit never saw."""
    share = args.calibration_tokens // (len(DOMAINS) - 1)
    fit_windows = {name: calibration_windows(bp.tokenize(tokenizer, split_documents(domain_documents(name))["fit"]),
                                             seq_len, share) for name in sorted(DOMAINS)}
    rows = []
    for left_out, damping in ((d, damping) for d in sorted(DOMAINS) if d not in fitted_on
                              for damping in args.damping):
        calibration = torch.cat([w for name, w in fit_windows.items() if name != left_out])
        started = time.time()
        small = bp.extract_model(fitted, plan)
        refit = reconstruct(fitted, small, plan, calibration, damping, progress=False)
        rows.append({"target": target, "variant": "fitted cut, refit to fitted on the other domains",
                     "damping": damping, "left_out": left_out, "fraction": plan.fraction,
                     "seconds": time.time() - started, "refit": refit,
                     "perplexity": score(small, (left_out, *fitted_on))})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/main")
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--calibration-tokens", type=int, default=ExtractionConfig.calibration_tokens)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--methods", nargs="+", default=["least-squares"], choices=RECONSTRUCTIONS[1:],
                        help="what a refit does: least-squares columns, a bias (FLAP), or both")
    parser.add_argument("--damping", type=float, nargs="+", default=[0.01],
                        help="ridge towards the columns as cut, as a share of the kept inputs' mean second moment")
    parser.add_argument("--leave-out", action="store_true",
                        help="also refit the fitted cut calibrated on the other domains' fit splits (equal shares), "
                             "once per domain the fit never saw, and score that domain")
    parser.add_argument("--out", default="bench/results/reconstruction.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    config = read_config(args.run)
    networks = dict(zip(("fitted", "original"), (load_fitted_model(args.run)[0],
                                                  bp.load_model(str(fitted_model_path(args.run)))[0])))
    tokenizer = bp.load_model(str(fitted_model_path(args.run)))[1]
    posterior = load_fitted(args.run)
    totals = bp.ModelTotals.of(networks["original"], source_dtype(str(fitted_model_path(args.run))))
    named = (config.data.path or ",".join(DOMAINS)).split(",")  # the default corpus is every domain
    fitted_on = named if set(named) <= set(DOMAINS) else [Path(config.data.path).name]
    tests = {name: bp.tokenize(tokenizer, split_documents(domain_documents(name))["test"]) for name in sorted(DOMAINS)}
    fit_tokens = bp.tokenize(tokenizer, split_corpus(config.data)["fit"])
    calibration = calibration_windows(fit_tokens, config.fit.seq_len, args.calibration_tokens)

    def score(network, domains=tuple(tests)) -> dict:
        return {name: bp.perplexity(network, tests[name], 256, args.eval_tokens, progress=False)["perplexity"]
                for name in domains}

    rows = [{"target": "dense", "variant": name, "fraction": 1.0, "perplexity": score(network)}
            for name, network in networks.items()]
    print(rows, flush=True)
    for target in args.targets:
        plan, _ = run_plan(args.run, posterior, totals, Target.parse(target))
        for label in args.variants:
            cut_from, reference = VARIANTS[label]
            for method, damping in [(None, None)] if reference is None else itertools.product(args.methods,
                                                                                                args.damping):
                started = time.time()
                small = bp.extract_model(networks[cut_from], plan)
                refit = None if reference is None else reconstruct(networks[reference], small, plan, calibration,
                                                                   damping, progress=False, method=method)
                rows.append({"target": target, "variant": label if method in (None, "least-squares")
                             else f"{label} ({method})", "damping": damping, "fraction": plan.fraction,
                             "seconds": time.time() - started, "refit": refit, "perplexity": score(small)})
                print(rows[-1], flush=True)
        if args.leave_out:
            rows += leave_one_domain_out(networks["fitted"], plan, target, tokenizer, fitted_on, config.fit.seq_len,
                                         args, score)
    original = rows[1]["perplexity"]
    for row in rows:
        held_out = [row["perplexity"][d] / original[d] for d in tests if d not in fitted_on and d in row["perplexity"]]
        row["held_out_geomean_ratio_to_original"] = math.exp(sum(map(math.log, held_out)) / len(held_out))
    write_results({"run": str(Path(args.run).resolve()), "fitted_on": fitted_on, "eval_tokens": args.eval_tokens,
                   "calibration_tokens": int(calibration.numel()),
                   "how": f"one process, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}; "
                          f"perplexity over 256-token windows of each domain's test split",
                   "rows": rows}, args.out, plot)


if __name__ == "__main__":
    main()

"""Depth cuts from conditional re-scoring (``bayesprune.core.removal``) against SLEB and ShortGPT (frontier.json).

Each variant removes blocks one at a time, each the best given those already removed,
scored on seeded fit-split windows (SLEB's 8 × 128 by default), and is cut to 27 / 22
/ 18 / 15 of the 30 blocks; perplexity on the frontier's test corpora (8,192 tokens
each, fp32). Variants differ in the score (KL from the dense network or NLL), the
dtype the search runs in, the scoring windows, and whether a block posterior
restricts each step to its least-needed candidates. Results merge into
``bench/results/depth_search.json`` by variant name.

    .venv/bin/python bench/depth_search.py --variants kl-bf16-8 nll-bf16-8   # ≈ 5 min per variant
    .venv/bin/python bench/depth_search.py --variants nll-bf16-adaptive-32-posterior8 \
        --check runs/depth-estimators/straight-through nll-bf16-adaptive-128
    .venv/bin/python bench/depth_search.py --brute-force 27 8                 # ≈ 12 min; a diagnostic on test data
    .venv/bin/python bench/depth_search.py                                    # redraw depth_search.png
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import default_model_and_corpora, pyplot, save_figure

import bayesprune as bp
from bayesprune.baselines import baseline_plan
from bayesprune.core.removal import conditional_depth_search
from bayesprune.run.rundir import load_fitted

KEPT = (27, 22, 18, 15)
OUT = Path("bench/results/depth_search.json")
# name: settings of conditional_depth_search (windows: how many scoring windows it may use)
VARIANTS = {
    "nll-bf16-8": dict(score="nll", dtype=torch.bfloat16, windows=8),
    "kl-bf16-8": dict(score="distillation", dtype=torch.bfloat16, windows=8),
    "nll-bf16-adaptive-32": dict(score="nll", dtype=torch.bfloat16, windows=32),
    "nll-bf16-adaptive-64": dict(score="nll", dtype=torch.bfloat16, windows=64),
    "nll-bf16-adaptive-128": dict(score="nll", dtype=torch.bfloat16, windows=128),
    "nll-bf16-adaptive-32-posterior8": dict(score="nll", dtype=torch.bfloat16, windows=32,
                                            posterior="runs/depth-estimators/straight-through", candidates=8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS),
                        help="variants to measure (none: redraw the figure from the results)")
    parser.add_argument("--check", nargs=2, metavar=("POSTERIOR_RUN", "REFERENCE"),
                        help="check a block posterior's removal probabilities, and each variant's choice "
                             "probabilities, against the REFERENCE variant's removals")
    parser.add_argument("--brute-force", type=int, nargs=2, metavar=("KEPT", "POOL"),
                        help="diagnostic: score every cut to KEPT blocks that removes only blocks among the POOL "
                             "best single removals, on 64 calibration windows and on the test corpora (bfloat16)")
    args = parser.parse_args()
    if not args.variants and not args.check and not args.brute_force:  # only redraw the figure from the results
        plot(json.loads(OUT.read_text()), OUT.with_suffix(".png"))
        return
    torch.set_num_threads(2)
    model, corpora, shuffled = default_model_and_corpora()
    result = json.loads(OUT.read_text()) if OUT.exists() else {"variants": {}}
    result["how"] = (f"one process, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
                     "scoring windows: the first N of the seeded (0) shuffle of 128-token fit windows (N = 8 is "
                     "SLEB's calibration set); perplexity in fp32 over 256-token windows, 8,192 tokens per corpus")
    for name in args.variants:
        settings = VARIANTS[name]
        proposal = None
        if "posterior" in settings:  # the block-gate fit's marginal keep probability where it cuts to 15 blocks
            posterior = load_fitted(settings["posterior"])
            cost = posterior.solve(f"{min(KEPT)}layers", bp.ModelTotals.of(model))
            proposal = posterior.block_keep_probability(cost, point=True)[0]
        gated = bp.gate(model.to(settings["dtype"]), bp.GateConfig(units=("block",)))
        search = conditional_depth_search(gated, shuffled[:settings["windows"]], 30 - min(KEPT), settings["score"],
                                          proposal, settings.get("candidates"))
        gated.remove()
        model.float()
        rows = []
        for kept in KEPT:
            plan = baseline_plan(model, search.block_scores(30), f"{kept}layers")
            small = bp.extract_model(model, plan)
            rows.append({"kept": kept, "removed": sorted(set(range(30)) - set(plan.kept_layers)),
                         **{c: bp.perplexity(small, t, 256, 8192, progress=False)["perplexity"]
                            for c, t in corpora.items()}})
            print(name, rows[-1], flush=True)
        result["variants"][name] = {**settings, "dtype": str(settings["dtype"]), "search": search.record(), "rows": rows,
                                    "date": time.strftime("%Y-%m-%d")}
        OUT.write_text(json.dumps(result, indent=1))
    if args.brute_force:
        result[f"brute_force_{args.brute_force[0]}"] = brute_force(model, result, shuffled[:64], corpora,
                                                                   *args.brute_force)
        OUT.write_text(json.dumps(result, indent=1))
    if args.check:
        result["check"] = check(result, *args.check, bp.ModelTotals.of(model))
        print(json.dumps(result["check"], indent=1))
        OUT.write_text(json.dumps(result, indent=1))
    plot(result, OUT.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """Perplexity over SLEB's (frontier.json) against kept blocks, per variant and ShortGPT, per corpus."""
    frontier = json.loads(Path("bench/results/frontier.json").read_text())["rows"]
    reference = {(r["method"], r["kept_layers"]): r for r in frontier if r["method"] in ("sleb", "shortgpt")}
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, corpus in zip(axes, ("shakespeare", "kjv")):
        def ratio(kept: int, value: float) -> float:
            return value / reference["sleb", kept][corpus]

        ax.plot(KEPT, [ratio(k, reference["shortgpt", k][corpus]) for k in KEPT], "k:", lw=2, label="shortgpt")
        ax.axhline(1.0, color="k", lw=2, label="sleb (1,024 tokens)")
        for name, variant in result["variants"].items():
            ax.plot([r["kept"] for r in variant["rows"]], [ratio(r["kept"], r[corpus]) for r in variant["rows"]],
                    "o-", ms=3, label=name)
        ax.set(xlabel="blocks kept (of 30)", ylabel="perplexity / SLEB's (log scale)", yscale="log",
               title=f"{corpus} test", ylim=(0.8, 1.6))
        ax.invert_xaxis()
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


def brute_force(model, result: dict, windows: torch.Tensor, corpora: dict, kept: int, pool: int) -> dict:
    """Every cut to ``kept`` blocks within the ``pool`` best single removals (nll-bf16-8's first step):
    calibration NLL and test perplexity, to see whether the calibration-best cut is the test-best."""
    from itertools import combinations

    from bayesprune.core.likelihood import calibration_nll

    first = result["variants"]["nll-bf16-8"]["search"]["steps"][0]["scores"]
    blocks = sorted(first, key=first.get)[:pool]
    gated = bp.gate(model.to(torch.bfloat16), bp.GateConfig(units=("block",)))
    rows, started = [], time.time()
    for removed in combinations(sorted(int(b) for b in blocks), 30 - kept):
        on = torch.ones(30)
        on[list(removed)] = 0
        with gated.gates_set({"block": on}):
            rows.append({"removed": list(removed), "calibration_nll": calibration_nll(gated, windows),
                         **{c: bp.perplexity(gated, t, 256, 8192, progress=False)["perplexity"]
                            for c, t in corpora.items()}})
        print(rows[-1], flush=True)
    gated.remove()
    model.float()
    return {"kept": kept, "pool": [int(b) for b in blocks], "calibration_windows": windows.shape[0],
            "dtype": "bfloat16", "seconds": time.time() - started, "rows": rows}


BINS = (0.0, 0.1, 0.5, 0.9, 1.0001)


def check(result: dict, posterior_run: str, reference: str, totals) -> dict:
    """How often blocks a posterior (or a search step) is sure about are what the reference search removes."""
    order = result["variants"][reference]["search"]["order"]
    posterior = load_fitted(posterior_run)
    bins = [{"p_removed": f"{lo:.1f}-{min(hi, 1):.1f}", "blocks": 0, "removed_by_reference": 0}
            for lo, hi in zip(BINS, BINS[1:])]
    for kept in KEPT:
        k = 30 - kept
        p = posterior.removal_probability(posterior.solve(f"{kept}layers", totals))[:, k]
        for block in range(30):
            row = next(b for b, (lo, hi) in zip(bins, zip(BINS, BINS[1:])) if lo <= p[block] < hi)
            row["blocks"] += 1
            row["removed_by_reference"] += block in order[:k]
    steps = {}
    for name, variant in result["variants"].items():
        if name == reference or "search" not in variant:
            continue
        agree = {"sure (P >= 0.9)": [0, 0], "unsure (P < 0.9)": [0, 0]}
        for k, step in enumerate(variant["search"]["steps"]):
            if variant["search"]["order"][:k] != order[:k]:
                break  # the paths have parted: later steps see other sets
            cell = agree["sure (P >= 0.9)" if step["choice_probability"] >= 0.9 else "unsure (P < 0.9)"]
            cell[0] += 1
            cell[1] += step["removed"] == order[k]
        steps[name] = {label: {"steps": n, "same_choice": same} for label, (n, same) in agree.items()}
    return {"posterior": posterior_run, "reference": reference, "sizes": list(KEPT), "posterior_bins": bins,
            "search_steps_on_the_reference_path": steps}


if __name__ == "__main__":
    main()

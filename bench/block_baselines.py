"""Block-removal baselines vs bayesprune block gates on the default model, no recovery.

ShortGPT and SLEB score blocks on calibration windows drawn (seeded) from the fit
split; random (3 seeds) and drop-last need none; bayesprune reads a fitted run's
posterior. Every method's blocks are cut by the same extraction code and scored
on the test split. Writes ``bench/results/block_baselines.json`` and ``.png``.

    .venv/bin/python bench/block_baselines.py --run runs/depth --targets 0.75 0.5
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from common import plot_frontier, write_results

import bayesprune as bp
from bayesprune.baselines import baseline_plan, block_scores, sleb_scores
from bayesprune.pipeline import CONFIG_FILE
from bayesprune.posterior import POSTERIOR_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/depth", help="a fitted bayesprune run with block gates")
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sleb-depth", type=int, default=15, help="blocks SLEB removes (15 of 30 reach 50 %%)")
    parser.add_argument("--out", default="bench/results/block_baselines.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = bp.RunConfig.load(Path(args.run) / CONFIG_FILE)
    model, tokenizer = bp.load_model(config.model)
    splits = bp.load_splits(tokenizer, config.data)
    fit_windows = bp.windows(splits["fit"], args.seq_len)
    pick = torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))
    calibration = fit_windows[pick[:args.calibration_windows]]
    posterior = bp.GatePosterior.load(Path(args.run) / POSTERIOR_FILE)
    methods = {"bayesprune": (posterior.block_keep_probability().mean(0), 0, 0.0)}
    for method, seed in [("shortgpt", 0), ("sleb", 0), ("random", 0), ("random", 1), ("random", 2), ("drop-last", 0)]:
        started = time.time()
        if method == "sleb":  # the greedy search only needs to go as deep as the smallest target
            scores = sleb_scores(model, calibration, num_remove=args.sleb_depth)
        else:
            scores = block_scores(method, model, calibration, seed)
        name = method if method != "random" else f"random-{seed}"
        tokens = calibration.numel() if method in ("shortgpt", "sleb") else 0
        methods[name] = (scores, tokens, time.time() - started)
    rows = []
    for name, (scores, tokens, seconds) in methods.items():
        for target in args.targets:
            plan = baseline_plan(model, scores, target)
            small = bp.extract_model(model, plan)
            ppl = bp.perplexity(small, splits["test"], config.data.eval_window, config.data.eval_tokens,
                                progress=False)
            rows.append({"method": name, "target": target, "fraction": plan.fraction, "kept_layers": plan.kept_layers,
                         "calibration_tokens": tokens, "scoring_seconds": seconds, **ppl})
            print(f"{name:<11} {target:>5} kept {len(plan.layers)} blocks ({plan.fraction:.3f}): "
                  f"perplexity {ppl['perplexity']:.2f}  removed {[i for i in range(30) if i not in plan.kept_layers]}",
                  flush=True)
    write_results({"rows": rows, "run": args.run, "calibration_windows": args.calibration_windows,
                   "seq_len": args.seq_len, "machine": platform.platform(),
                   "how": "one process; the same extraction code for every method; test split perplexity"},
                  args.out, plot)


def plot(rows: list[dict], path: Path) -> None:
    groups = {}
    for r in rows:
        groups.setdefault(r["method"], []).append(r)
    plot_frontier(groups, path, "Block removal, no recovery")


if __name__ == "__main__":
    main()

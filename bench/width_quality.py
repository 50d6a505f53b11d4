"""Held-out perplexity of depth-only, width-only and joint extraction from fitted runs.

Loads the default model once, reads each run's posterior, chooses the sub-network
for each target and form, cuts it in memory and scores the test split (plays the
fit never saw). Writes ``bench/results/width_quality.json`` and a plot of
perplexity against the fraction of decoder parameters kept.

    .venv/bin/python bench/width_quality.py --runs runs/depth runs/width runs/joint --targets 0.75 0.5
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from common import plot_frontier, write_results

import bayesprune as bp
from bayesprune.run.rundir import RunDir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/depth", "runs/width", "runs/joint"])
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--out", default="bench/results/width_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    config = bp.RunConfig.load(Path(args.runs[0]) / RunDir.CONFIG)
    model, tokenizer = bp.load_model(config.model)
    test = bp.load_splits(tokenizer, config.data)["test"]

    def score(m) -> dict:
        return bp.perplexity(m, test, config.data.eval_window, config.data.eval_tokens, progress=False)

    rows = [{"run": "dense", "units": [], "target": "1.0", "form": "-", "fraction": 1.0,
             "parameters": bp.model_size(model)["parameters"], **score(model)}]
    print(f"dense perplexity {rows[0]['perplexity']:.2f}", flush=True)
    for run in args.runs:
        posterior = bp.GatePosterior.load(Path(run) / RunDir.POSTERIOR)
        widths = list(posterior.units)
        for target in args.targets:
            for form, multiple in [("per-layer", 1)] + ([("uniform", 1), ("per-layer", 64)] if widths else []):
                started = time.time()
                small, plan = bp.extract(model, posterior, target, form, multiple)
                row = {"run": run, "units": list(posterior.kinds), "target": target, "form": form,
                       "multiple": multiple, "fraction": plan.fraction, "parameters": plan.parameters,
                       "kept_layers": len(plan.layers), **score(small), "seconds": time.time() - started}
                rows.append(row)
                print(f"{run:<12} {target:>5} {form:<9} ×{multiple:<3} kept {plan.fraction:.3f} of decoder, "
                      f"{len(plan.layers)} blocks: perplexity {row['perplexity']:.2f}", flush=True)
                del small
    result = {"rows": rows, "data": config.data.to_dict(), "machine": platform.platform(),
              "how": "one process; test split of the default corpus; perplexity over eval_tokens in windows"}
    write_results(result, args.out, plot)


def plot(rows: list[dict], path: Path) -> None:
    groups = {}
    for r in rows[1:]:
        groups.setdefault(f"{Path(r['run']).name} ({'+'.join(r['units'])}) {r['form']}"
                          f"{' ×' + str(r['multiple']) if r.get('multiple', 1) > 1 else ''}", []).append(r)
    plot_frontier(groups, path, "Held-out perplexity after extraction, no recovery", dense=rows[0]["perplexity"])


if __name__ == "__main__":
    main()

"""Depth cuts from block-gate fits: straight-through or two-point (local expectation) block gradients,
with blocks' importance 1 or their measured removal cost.

Fits the default model with block gates only (cost-conditioned, frozen weights, batch 4 × 128)
once per estimator, then cuts each posterior to 90 / 75 / 60 / 50 % of decoder parameters
(27 / 22 / 18 / 15 blocks) and scores the cuts on the frontier's test corpora (8,192 tokens
each), next to SLEB and ShortGPT from ``frontier.json`` and one-shot leave-one-out from
``depth_loo.json``.

    .venv/bin/python bench/depth.py --steps 150 --two-point-blocks 4   # ≈ 25 min on 2 CPU cores
"""

import argparse
import json
import time
from pathlib import Path

import torch

import bayesprune as bp
from bayesprune.inputs.data import bible_path
from bayesprune.run.fit_job import run_fit
from bayesprune.run.rundir import RunDir

TARGETS = ("0.9", "0.75", "0.6", "0.5")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--steps", type=int, default=150)
parser.add_argument("--two-point-blocks", type=int, default=4)
parser.add_argument("--runs", default="runs/depth-estimators")
parser.add_argument("--out", default="bench/results/depth.json")
args = parser.parse_args()
torch.set_num_threads(2)

model, tokenizer = bp.load_model()
splits = bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))
bible = bp.inputs.data.split_documents(bp.inputs.data.load_documents(bible_path()))["test"]
corpora = {"shakespeare": splits["test"], "kjv": bp.tokenize(tokenizer, bible)}
totals = bp.ModelTotals.of(model)

rows = []
VARIANTS = [("straight-through", "straight-through", 0, "ones"),
            (f"two-point ({args.two_point_blocks} blocks/step)", "two-point", args.two_point_blocks, "ones"),
            ("straight-through, removal importance", "removal-importance", 0, "removal")]
for label, folder, two_point, importance in VARIANTS:
    config = bp.RunConfig(gate=bp.GateConfig(units=("block",)))
    config.fit.steps, config.fit.two_point_blocks, config.data.eval_tokens = args.steps, two_point, 2048
    config.fit.block_importance = importance
    run = Path(args.runs) / folder
    started = time.time()
    if not (run / RunDir.POSTERIOR).is_file():
        run_fit(config, run, bp.ExtractionConfig(target=None), progress=True, log=lambda message: None)
    seconds = time.time() - started
    posterior = bp.GatePosterior.load(run / RunDir.POSTERIOR)
    for target in TARGETS:
        plan = posterior.plan(target, totals)
        small = bp.extract_model(model, plan)
        row = {"method": label, "target": target, "kept": len(plan.layers), "removed": plan.record()["removed_layers"],
               "fit_seconds": seconds, "fit_tokens": args.steps * 4 * 128,
               **{name: bp.perplexity(small, tokens, 256, 8192, progress=False)["perplexity"]
                  for name, tokens in corpora.items()}}
        print(row, flush=True)
        rows.append(row)
Path(args.out).write_text(json.dumps({"rows": rows, "steps": args.steps, "how": "one process, 2 threads; "
                                      "block gates only, frozen weights, batch 4 x 128"}, indent=1))

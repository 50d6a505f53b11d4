"""Depth cuts from conditional re-scoring (``bayesprune.depth``) against SLEB and ShortGPT (frontier.json).

Each variant removes blocks one at a time, each the best given those already removed,
scored on seeded fit-split windows (SLEB's 8 × 128 by default), and is cut to 27 / 22
/ 18 / 15 of the 30 blocks; perplexity on the frontier's test corpora (8,192 tokens
each, fp32). Variants differ in the score (KL from the dense network or NLL), the
dtype the search runs in, the scoring windows, and whether a block posterior
restricts each step to its least-needed candidates. Results merge into
``bench/results/depth_search.json`` by variant name.

    .venv/bin/python bench/depth_search.py --variants kl-bf16-8 nll-bf16-8
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import bayesprune as bp
from bayesprune.baselines import baseline_plan
from bayesprune.data import bible_path
from bayesprune.depth import conditional_depth_search

KEPT = (27, 22, 18, 15)
OUT = Path("bench/results/depth_search.json")
# name: settings of conditional_depth_search (windows: how many scoring windows it may use)
VARIANTS = {
    "nll-bf16-8": dict(score="nll", dtype=torch.bfloat16, windows=8),
    "kl-bf16-8": dict(score="distillation", dtype=torch.bfloat16, windows=8),
    "nll-bf16-adaptive-32": dict(score="nll", dtype=torch.bfloat16, windows=32),
    "nll-bf16-adaptive-64": dict(score="nll", dtype=torch.bfloat16, windows=64),
    "nll-bf16-adaptive-128": dict(score="nll", dtype=torch.bfloat16, windows=128),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = bp.load_model()
    splits = bp.load_splits(tokenizer, bp.DataConfig())
    bible = bp.split_documents(bp.load_documents(bible_path()))["test"]
    corpora = {"shakespeare": splits["test"], "kjv": bp.tokenize(tokenizer, bible)}
    fit_windows = bp.windows(splits["fit"], 128)
    shuffled = fit_windows[torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))]
    result = json.loads(OUT.read_text()) if OUT.exists() else {"variants": {}}
    result["how"] = (f"one process, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
                     "scoring windows: the first N of the seeded (0) shuffle of 128-token fit windows (N = 8 is "
                     "SLEB's calibration set); perplexity in fp32 over 256-token windows, 8,192 tokens per corpus")
    for name in args.variants:
        settings = VARIANTS[name]
        gated = bp.gate(model.to(settings["dtype"]), bp.GateConfig(units=("block",)))
        search = conditional_depth_search(gated, shuffled[:settings["windows"]], 30 - min(KEPT), settings["score"])
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


if __name__ == "__main__":
    main()

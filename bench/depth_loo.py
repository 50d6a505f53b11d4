"""Depth cuts from one-shot leave-one-out scores, to set against SLEB's greedy re-scoring (frontier.json).

Each block's score is the rise in calibration NLL when it alone is removed
(``bayesprune.core.inclusion.removal_importance``), on the same
8 × 128 seeded fit-split windows SLEB uses in ``frontier.py``. The lowest go first, with
no re-scoring. The cuts are scored on the frontier's test corpora (8,192 tokens each).

    .venv/bin/python bench/depth_loo.py     # ≈ 4 min on 2 CPU cores
"""

import json
import time
from pathlib import Path

import torch
from common import default_model_and_corpora

import bayesprune as bp
from bayesprune.baselines import baseline_plan
from bayesprune.core.inclusion import removal_importance

TARGETS = ("0.9", "0.75", "0.6", "0.5")

torch.set_num_threads(2)
model, corpora, shuffled = default_model_and_corpora()
calibration = shuffled[:8]

started = time.time()
gated = bp.gate(model, bp.GateConfig(units=("block",)))
importance = removal_importance(gated, calibration)  # each block's NLL rise when removed alone, over the mean
gated.remove()
result = {"removal_importance": importance.tolist(), "loo_seconds": time.time() - started, "rows": [],
          "how": "one process, 2 threads; 8 x 128 calibration windows (seed 0); perplexity over 256-token windows"}
for target in TARGETS:
    plan = baseline_plan(model, importance, target)
    small = bp.extract_model(model, plan)
    row = {"target": target, "kept": len(plan.layers),
           **{name: bp.perplexity(small, tokens, 256, 8192, progress=False)["perplexity"]
              for name, tokens in corpora.items()}}
    print(row, flush=True)
    result["rows"].append(row)
Path("bench/results/depth_loo.json").write_text(json.dumps(result, indent=1))

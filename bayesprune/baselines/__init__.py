"""What bayesprune is measured against: structured removal (real smaller checkpoints) and
unstructured / 2:4 sparsity (dense shapes)."""

from .structured import (BLOCK_BASELINES, BaselineResult, baseline_plan, block_influence, block_scores,
                         drop_last_scores, magnitude_plan, magnitude_scores, random_scores,
                         run_block_baseline, sleb_scores)
from .unstructured import (UNSTRUCTURED, UnstructuredResult, linear_fraction, nonzero_fraction, prune_unstructured,
                           sparsegpt_prune, sparsity_for, wanda_prune)

__all__ = [
    "BLOCK_BASELINES", "BaselineResult", "baseline_plan", "block_influence", "block_scores",
    "drop_last_scores", "magnitude_plan", "magnitude_scores", "random_scores", "run_block_baseline", "sleb_scores",
    "UNSTRUCTURED", "UnstructuredResult", "linear_fraction", "nonzero_fraction", "prune_unstructured",
    "sparsegpt_prune", "sparsity_for", "wanda_prune",
]

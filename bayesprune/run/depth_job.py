"""The depth job (``bayesprune depth``): a run's depth ranking re-scored conditionally, kept as ``depth.json``.

The search (:mod:`bayesprune.core.removal`) judges each removal given the blocks already removed;
block-count targets (``12layers``) of the run are then cut by it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core.config import DepthConfig, GateConfig
from ..inputs.data import load_splits, windows
from ..core.removal import DepthSearch, conditional_depth_search
from ..core.gates import gate
from ..core.io import read_json, write_json
from .rundir import DEPTH_FORMAT, RunDir, holding, load_fitted, load_fitted_model, read_config


def run_depth_search(run_dir: str | Path, depth: DepthConfig | None = None, device: str | None = None,
                     dtype: str | None = "bfloat16", progress: bool = True, force: bool = False) -> DepthSearch:
    """Re-score a fitted run's depth ranking conditionally on seeded fit-split windows, as ``depth`` says;
    writes ``depth.json``.

    The search runs on the run's network (its adapted or trained weights, if it has them) in
    ``dtype``: bfloat16 by default, which on the default model chooses the same blocks as
    float32, several times faster.
    """
    run_dir = Path(run_dir)
    depth = depth or DepthConfig()
    config, fitted = read_config(run_dir), load_fitted(run_dir)
    num_layers = len(fitted.layer_names)
    removals = num_layers // 2 if depth.removals is None else depth.removals
    if not 0 < removals < num_layers:
        raise ValueError(f"removals must be in [1, {num_layers - 1}] for this {num_layers}-block model, got {removals}")
    held = read_depth(run_dir, num_layers)
    if held is not None and not force:
        raise FileExistsError(f"{RunDir(run_dir).depth} already ranks {len(held.order)} removals ({held.score}, "
                              f"{held.tokens:,} tokens); --force replaces it")
    with holding(run_dir, "depth") as run:
        model, tokenizer = load_fitted_model(run_dir, device, dtype)
        fit_windows = windows(load_splits(tokenizer, config.data)["fit"], config.fit.seq_len)
        order = torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(config.fit.seed))
        gated = gate(model, GateConfig(units=("block",)))
        search = conditional_depth_search(gated, fit_windows[order[:depth.windows]], removals, depth.score,
                                          chunk=depth.chunk, progress=progress)
        write_json(run.depth, DEPTH_FORMAT, {"dtype": dtype, **search.record()})
    return search


def read_depth(run_dir: str | Path, num_layers: int) -> DepthSearch | None:
    """The run's conditional depth ranking of its ``num_layers`` blocks, if ``bayesprune depth`` wrote one."""
    path = RunDir(run_dir).depth
    if not path.is_file():
        return None
    search = DepthSearch.from_record(read_json(path, DEPTH_FORMAT))
    order = search.order
    if not all(0 <= b < num_layers for b in order) or len(set(order)) != len(order):
        raise DEPTH_FORMAT.damaged(path, f"its order {order} must name distinct blocks of 0..{num_layers - 1}; "
                                         f"rerun 'bayesprune depth'")
    return search


def format_depth(search: DepthSearch) -> str:
    """The removal order as a table: step, block, its score and the next best, the choice's probability."""
    lines = [f"{'step':>4}  {'block':>5}  {search.score + ' /token':>16}  {'runner-up':>16}  {'P(best)':>7}"]
    for k, step in enumerate(search.steps, 1):
        ranked = sorted(step.scores.items(), key=lambda item: item[1])
        runner = f"{ranked[1][1]:.4f} (#{ranked[1][0]})" if len(ranked) > 1 else "–"
        lines.append(f"{k:>4}  {step.removed:>5}  {ranked[0][1]:>16.4f}  {runner:>16}  {step.choice_probability:>7.2f}")
    return "\n".join(lines)


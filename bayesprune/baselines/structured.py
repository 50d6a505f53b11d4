"""Block-removal baselines, scored on calibration windows and cut by the same extraction path.

* ShortGPT (Men et al., 2024): Block Influence ``BI_l = 1 − E_tokens[cos(x_l, x_{l+1})]``
  between a block's input and output hidden states; the least influential go first.
* SLEB (Song et al., 2024): remove, one at a time, the block whose removal raises
  the calibration negative log-likelihood least, re-scoring the rest after each removal
  (the greedy engine of :mod:`bayesprune.core.removal`, scoring every window each step).
* random (seeded) and drop-last.
* magnitude (structured width): every head group and neuron scored by the L2 norm
  of all the weights removed with it (query/key/value rows and output-projection
  columns; gate/up rows and down-projection columns); the same share of the
  lowest-norm heads and neurons goes in every block.

Each scorer returns one score per block, higher = keep; :func:`baseline_plan`
turns scores into an :class:`~bayesprune.core.selection.ExtractionPlan` for a target,
so baselines produce real checkpoints through :func:`~bayesprune.cut.extraction.extract_model`.
Calibration windows should come from the fit split, never validation or test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.architectures import decoder_layers
from ..core.sizes import unit_norms
from ..core.config import GateConfig
from ..inputs.data import batches
from ..core.removal import conditional_depth_search
from ..core.gates import gate
from ..core.plan import ExtractionPlan
from ..core.selection import choose_blocks, choose_units
from ..core.targets import ModelTotals, Target

BLOCK_BASELINES = ("shortgpt", "sleb", "random", "drop-last")


@torch.no_grad()
def block_influence(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """ShortGPT's Block Influence of every decoder block, averaged over all calibration tokens."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def recorder(index: int):
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            outputs = output[0] if isinstance(output, tuple) else output
            sums[index] += F.cosine_similarity(inputs.float(), outputs.float(), dim=-1).double().sum().cpu()
        return hook

    handles = [block.register_forward_hook(recorder(i), with_kwargs=True) for i, block in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for batch in batches(windows, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return 1 - sums / windows.numel()


@torch.no_grad()
def sleb_scores(model, windows: torch.Tensor, num_remove: int | None = None, batch_size: int = 4,
                progress: bool = True) -> torch.Tensor:
    """SLEB's greedy removal order as scores: the ``k``-th block removed scores ``k``.

    Blocks never removed (``num_remove`` < layers) share the top score. The model is
    gated for the search and given back untouched.
    """
    gated = gate(model, GateConfig(units=("block",)))
    num_layers = gated.num_layers
    num_remove = num_layers - 1 if num_remove is None else num_remove
    try:
        if not 0 <= num_remove < num_layers:
            raise ValueError(f"num_remove must be in [0, {num_layers}), got {num_remove}")
        search = conditional_depth_search(gated, windows, num_remove, "nll", chunk=max(2, windows.shape[0]),
                                          batch_size=batch_size, progress=progress)
    finally:
        gated.remove()
    return search.block_scores(num_layers)


def random_scores(num_layers: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(num_layers, generator=torch.Generator().manual_seed(seed)).double()


def drop_last_scores(num_layers: int) -> torch.Tensor:
    return -torch.arange(num_layers, dtype=torch.float64)


@dataclass
class BaselineResult:
    """A baseline's plan for one target, with what it cost to score."""

    method: str
    plan: ExtractionPlan
    scores: torch.Tensor
    calibration_tokens: int
    seconds: float

    def record(self) -> dict:
        return {"method": self.method, "calibration_tokens": self.calibration_tokens,
                "scoring_seconds": self.seconds, "scores": self.scores.tolist(), **self.plan.record()}


def block_scores(method: str, model, windows: torch.Tensor | None = None, seed: int = 0,
                 progress: bool = True) -> torch.Tensor:
    """Scores of one of :data:`BLOCK_BASELINES` (higher = keep)."""
    num_layers = len(decoder_layers(model))
    if method in ("shortgpt", "sleb") and windows is None:
        raise ValueError(f"{method} needs calibration windows from the fit split")
    if method == "shortgpt":
        return block_influence(model, windows)
    if method == "sleb":
        return sleb_scores(model, windows, progress=progress)
    if method == "random":
        return random_scores(num_layers, seed)
    if method == "drop-last":
        return drop_last_scores(num_layers)
    raise ValueError(f"unknown baseline {method!r}; choose one of {list(BLOCK_BASELINES)}")


def baseline_plan(model, scores: torch.Tensor, target: Target | str | float) -> ExtractionPlan:
    """Remove blocks lowest score first until ``target`` fits."""
    gated = gate(model, GateConfig(units=("block",)))
    sizes = gated.unit_parameters()
    gated.remove()
    return choose_blocks(scores, sizes, ModelTotals.of(model), target)


def run_block_baseline(method: str, model, target: Target | str | float, windows: torch.Tensor | None = None,
                       seed: int = 0, progress: bool = True) -> BaselineResult:
    """Score the blocks with ``method`` and plan the cut for ``target``."""
    started = time.time()
    scores = block_scores(method, model, windows, seed, progress)
    seconds = time.time() - started
    tokens = 0 if windows is None or method in ("random", "drop-last") else windows.numel()
    return BaselineResult(method, baseline_plan(model, scores, target), scores, tokens, seconds)


@torch.no_grad()
def magnitude_scores(model) -> dict[str, torch.Tensor]:
    """The magnitude baseline's scores: :func:`unit_norms` in double precision."""
    return unit_norms(model, ("head", "neuron"), torch.float64)


def magnitude_plan(model, target: Target | str | float, form: str = "uniform", multiple: int = 1) -> ExtractionPlan:
    """The magnitude baseline's plan: lowest-norm head groups and neurons go first in every block."""
    scores = magnitude_scores(model)
    gated = gate(model, GateConfig(units=tuple(scores)))
    sizes = gated.unit_parameters()
    gated.remove()
    return choose_units(scores, sizes, ModelTotals.of(model), target, form, multiple)

"""Held-out perplexity over a fixed token budget, and model size."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.architectures import count_bytes, count_parameters
from ..core.likelihood import sequence_nll


@torch.no_grad()
def perplexity(model, tokens: torch.Tensor, window: int = 256, budget: int = 16384,
               batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity on the first ``budget`` tokens of ``tokens``.

    The tokens are cut into non-overlapping windows of ``window`` tokens, each scored
    on its own (no context carried between windows); the first token of each window
    is context only, so ``budget - budget // window`` tokens are predicted.
    """
    n_windows = min(budget, tokens.numel()) // window
    if n_windows == 0:
        raise ValueError(f"need at least {window} evaluation tokens, have {tokens.numel()}")
    windows = tokens[: n_windows * window].view(n_windows, window)
    was_training = model.training
    model.eval()
    total = 0.0
    batches = range(0, n_windows, batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        total += sequence_nll(model, windows[start:start + batch_size]).sum().item()
    model.train(was_training)
    predicted = n_windows * (window - 1)
    nll = total / predicted
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens_scored": predicted,
            "window": window, "windows": n_windows}


def model_size(model, directory: str | Path | None = None) -> dict:
    """Parameter count and bytes of ``model``; with ``directory``, also its weight files on disk."""
    size = {"parameters": count_parameters(model), "bytes": count_bytes(model)}
    if directory is not None and Path(directory).is_dir():
        size["file_bytes"] = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
    return size

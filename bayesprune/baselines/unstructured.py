"""Unstructured and N:M baselines: Wanda and SparseGPT, layer by layer through the pruned model.

* Wanda (Sun et al., 2024): weight ``W_ij`` scores ``|W_ij| · ‖X_j‖₂`` (the norm of
  input feature ``j`` over the calibration tokens); each output row drops its lowest
  scores, or the 2 lowest of every 4 consecutive inputs for 2:4.
* SparseGPT (Frantar & Alistarh, 2023): optimal-brain-surgeon pruning with the
  layer Hessian ``H = 2 X Xᵀ / n``. Columns are visited left to right in blocks;
  each block's mask is chosen adaptively from ``w² / [H⁻¹]²_jj`` of the *already
  updated* weights, each pruned weight's error is spread over the columns to its
  right through the Cholesky factor of ``H⁻¹``, and updates outside the block are
  applied lazily once per block.

Both run block by block as the papers do: the calibration inputs of block ``l`` are
the outputs of blocks ``0 … l−1`` *after* they were pruned. Shapes do not change, so
the pruned model is as large and as fast as the dense one; the kept fraction counts
non-zero decoder parameters.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..core.architectures import count_parameters, decoder_layers
from ..inputs.data import batches

UNSTRUCTURED = ("wanda", "sparsegpt")


def wanda_prune(weight: torch.Tensor, feature_sq_norms: torch.Tensor, sparsity: float,
                pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """``weight`` (out, in) with Wanda's mask applied.

    ``feature_sq_norms`` is ``‖X_j‖²`` per input feature; ``pattern=(2, 4)`` prunes
    2 of every 4 consecutive inputs of each row instead of ``sparsity`` per row.
    """
    score = weight.abs().double() * feature_sq_norms.double().sqrt()
    prune = torch.zeros_like(weight, dtype=torch.bool)
    if pattern is not None:
        n, m = pattern
        for start in range(0, weight.shape[1], m):
            group = score[:, start:start + m]
            lowest = torch.topk(group, min(n, group.shape[1]), dim=1, largest=False).indices
            prune.scatter_(1, start + lowest, True)
    else:
        count = round(weight.shape[1] * sparsity)
        lowest = torch.argsort(score, dim=1, stable=True)[:, :count]
        prune.scatter_(1, lowest, True)
    return weight.masked_fill(prune, 0)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    pattern: tuple[int, int] | None = None, block_size: int = 128,
                    damp: float = 0.01) -> torch.Tensor:
    """``weight`` (out, in) pruned by SparseGPT given the layer Hessian ``X Xᵀ`` (in, in).

    ``damp`` is added to the diagonal as a fraction of its mean; inputs that never
    fire (zero Hessian diagonal) have their weights pruned outright.
    """
    W = weight.double().contiguous().clone()
    H = hessian.double().clone()
    columns = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(columns, dtype=H.dtype, device=H.device)
    # Upper Cholesky factor of H⁻¹: row i holds the update direction once columns < i are fixed.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = W[:, start:end].clone(memory_format=torch.contiguous_format)
        inv = inverse[start:end, start:end]
        d = torch.diagonal(inv)
        errors = torch.zeros_like(block)
        if pattern is None:
            saliency = block ** 2 / d ** 2
            count = round(saliency.numel() * sparsity)
            prune = torch.zeros_like(block, dtype=torch.bool)
            if count:
                prune.view(-1)[torch.argsort(saliency.view(-1), stable=True)[:count]] = True
        else:
            prune = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                saliency = block[:, i:i + m] ** 2 / d[i:i + m] ** 2
                prune.scatter_(1, i + torch.topk(saliency, n, dim=1, largest=False).indices, True)
            w = block[:, i]
            kept = w.masked_fill(prune[:, i], 0)
            error = (w - kept) / d[i]
            block[:, i:] -= error[:, None] * inv[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        W[:, start:end] = block
        W[:, end:] -= errors @ inverse[start:end, end:]
    return W.to(weight.dtype)


def _linears(block: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def _weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) whatever the module stores."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


class _StopForward(Exception):
    pass


def _to(value, device):
    """Tensors (inside tuples, lists and dicts too) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _first_block_inputs(model, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, tuple, dict]]:
    """Per calibration batch: the hidden states, other arguments and keyword arguments block 0 receives."""
    captured = []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, tuple(args[1:]), kwargs))
        raise _StopForward

    handle = decoder_layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        device = next(model.parameters()).device
        for batch in batches(windows, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(block: nn.Module, inputs: list[tuple[torch.Tensor, tuple, dict]]) -> list[torch.Tensor]:
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


class _InputStatistics:
    """Per linear module: the sum of squared inputs per feature (Wanda) or the sum of ``x xᵀ`` (SparseGPT)."""

    def __init__(self, modules: dict[str, nn.Module], full: bool):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = [m.register_forward_hook(self._recorder(name, full)) for name, m in modules.items()]

    def _recorder(self, name: str, full: bool):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            stat = x.T @ x if full else (x ** 2).sum(0)
            self.sums[name] = self.sums[name] + stat if name in self.sums else stat
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class UnstructuredResult:
    """What an unstructured baseline did to the model, and what it cost."""

    method: str
    sparsity: float
    pattern: tuple[int, int] | None
    kept_fraction: float
    calibration_tokens: int
    seconds: float

    def record(self) -> dict:
        return {"method": self.method, "sparsity": self.sparsity,
                "pattern": None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}",
                "fraction_of_decoder": self.kept_fraction, "calibration_tokens": self.calibration_tokens,
                "scoring_seconds": self.seconds}


def linear_fraction(model) -> float:
    """The share of decoder parameters that sit in prunable linear weights."""
    layers = decoder_layers(model)
    linear = sum(_weight_view(m).numel() for block in layers for m in _linears(block).values())
    return linear / sum(count_parameters(block) for block in layers)


def sparsity_for(model, kept_fraction: float) -> float:
    """The per-layer sparsity that keeps ``kept_fraction`` of decoder parameters."""
    sparsity = (1 - kept_fraction) / linear_fraction(model)
    if not 0 <= sparsity < 1:
        raise ValueError(f"kept fraction {kept_fraction} cannot be reached by pruning linear weights "
                         f"({linear_fraction(model):.3f} of decoder parameters)")
    return sparsity


def nonzero_fraction(model) -> float:
    """Decoder parameters left after zeros in linear weights are taken out, over all decoder parameters."""
    layers = decoder_layers(model)
    zeros = sum(int((m.weight == 0).sum()) for block in layers for m in _linears(block).values())
    total = sum(count_parameters(block) for block in layers)
    return (total - zeros) / total


@torch.no_grad()
def prune_unstructured(model, windows: torch.Tensor, method: str, sparsity: float = 0.5,
                       pattern: tuple[int, int] | None = None, batch_size: int = 4,
                       progress: bool = True, device: str | torch.device | None = None) -> UnstructuredResult:
    """Prune every linear weight of every decoder block of ``model`` in place with ``method``.

    ``windows`` are calibration token windows from the fit split; ``pattern=(2, 4)``
    asks for 2:4 sparsity instead of ``sparsity``. With ``device``, each block is moved
    there for its calibration and pruning and then back, one at a time, so a model
    larger than the device's memory can be pruned.
    """
    if method not in UNSTRUCTURED:
        raise ValueError(f"unknown method {method!r}; choose one of {list(UNSTRUCTURED)}")
    if pattern is None and not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if pattern is not None and not 0 < pattern[0] < pattern[1]:
        raise ValueError(f"pattern must be n:m with 0 < n < m, got {pattern}")
    started = time.time()
    was_training = model.training
    model.eval()
    inputs = _first_block_inputs(model, windows, batch_size)
    home = next(model.parameters()).device
    device = home if device is None else torch.device(device)
    inputs = _to(inputs, device)
    for block in tqdm(decoder_layers(model), desc=method, disable=not progress):
        block.to(device)
        modules = _linears(block)
        stats = _InputStatistics(modules, full=method == "sparsegpt")
        try:
            _run_block(block, inputs)
        finally:
            stats.close()
        for name, module in modules.items():
            weight = _weight_view(module)
            if method == "wanda":
                pruned = wanda_prune(weight, stats.sums[name], sparsity, pattern)
            else:
                pruned = sparsegpt_prune(weight, stats.sums[name], sparsity, pattern)
            weight.copy_(pruned)
        outputs = _run_block(block, inputs)
        inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, inputs)]
        block.to(home)
    model.train(was_training)
    return UnstructuredResult(method, sparsity if pattern is None else pattern[0] / pattern[1], pattern,
                              nonzero_fraction(model), windows.numel(), time.time() - started)

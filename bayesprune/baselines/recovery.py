"""Recovery fine-tuning: train a pruned model on a fixed number of fit-split tokens.

Used to give structured baselines the token budget a bayesprune fit spends, so that
methods are compared at equal data: ``steps × batch_size × seq_len`` tokens, windows
drawn (seeded) from the fit split, AdamW without weight decay, linear warm-up over
the first tenth then cosine decay, gradient norm clipped.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from ..core.likelihood import sequence_nll
from ..core.model import NonFiniteLossError


def recover(model, tokens: torch.Tensor, num_tokens: int, seq_len: int = 128, batch_size: int = 4,
            lr: float = 5e-5, clip: float = 1.0, seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune every parameter of ``model`` in place on about ``num_tokens`` tokens of ``tokens``.

    Returns the steps, tokens, seconds and the loss of each step. A non-finite loss
    stops training with :class:`NonFiniteLossError` before it reaches the weights.
    """
    steps = max(1, round(num_tokens / (batch_size * seq_len)))
    starts_max = tokens.numel() - seq_len
    if starts_max < 1:
        raise ValueError(f"{tokens.numel()} fit tokens are fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))
    was_training = model.training
    model.train()
    losses = []
    started = time.time()
    for step in tqdm(range(steps), desc="recovery", disable=not progress):
        starts = torch.randint(0, starts_max, (batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        loss = sequence_nll(model, batch).sum() / (batch_size * (seq_len - 1))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"recovery loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.train(was_training)
    model.zero_grad(set_to_none=True)
    return {"steps": steps, "tokens": steps * batch_size * seq_len, "seconds": time.time() - started,
            "lr": lr, "losses": losses}

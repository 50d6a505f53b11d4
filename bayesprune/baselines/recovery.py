"""Recovery fine-tuning: train a pruned model on a fixed number of fit-split tokens.

Used to give structured baselines the token budget a bayesprune fit spends, so that
methods are compared at equal data: ``steps × batch_size × seq_len`` tokens, windows
drawn (seeded) from the fit split. It is the fit's own optimiser and loop
(:func:`bayesprune.core.fit.optimise`: AdamW without weight decay, linear warm-up over
the first tenth then cosine decay to 0.1×, gradient norm clipped) on another objective:
the pruned model's next-token NLL.
"""

from __future__ import annotations

import time

import torch

from ..core.config import FitConfig
from ..core.fit import make_optimizer, optimise
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
    config = FitConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, weights="joint", weight_lr=lr,
                       weight_decay=0.0, warmup_steps=max(1, steps // 10), schedule="cosine", clip_norm=clip,
                       seed=seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = make_optimizer([], 0.0, [p for p in model.parameters() if p.requires_grad], config)

    def step_loss(step: int):
        starts = torch.randint(0, starts_max, (batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
        loss = sequence_nll(model, batch).sum() / (batch_size * (seq_len - 1))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"recovery loss is {loss.item()} at step {step}")
        return loss, loss.item(), {"nll": f"{loss.item():.3f}"}

    was_training = model.training
    model.train()
    started = time.time()
    try:
        losses = optimise(step_loss, optimizer, config, "recovery", progress)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {"steps": steps, "tokens": steps * batch_size * seq_len, "seconds": time.time() - started,
            "lr": lr, "losses": losses}

"""Recovery fine-tuning: train a cut model on fit-split text to make up for what the cut removed.

The extraction's last step (``ExtractionConfig.recovery_steps``, by default more for a deeper cut), and
the equal-budget recovery the structured baselines get (``bench/frontier.py``): ``steps × batch_size × seq_len``
tokens, windows drawn (seeded) from the tokens given. It is the fit's own optimiser and loop
(:func:`bayesprune.core.fit.optimise`: AdamW without weight decay, linear warm-up over the first
tenth then cosine decay to 0.1×, gradient norm clipped) on the fit's own likelihoods
(:mod:`bayesprune.core.likelihood`), scoring the cut model: its next-token NLL, or its KL from the
dense network on the same windows (distillation). The weights it trains stay in their own dtype;
``compute`` runs the forward pass in another (bfloat16 autocast), as the fit runs its network.
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..core.config import ExtractionConfig, FitConfig
from ..core.cpu import eager_attention
from ..core.fit import make_optimizer, optimise
from ..core.likelihood import DistillationLikelihood, NetworkTeacher, NextTokenLikelihood
from ..core.model import NonFiniteLossError
from ..inputs.pretrained import native_dtype

RECOVERY_BATCH = 4  # windows of the fit's length an extraction's recovery step trains on
RECOVERY_SEED = 0  # the draw of those windows, the same for every fit
STEPS_PER_DECODER = 200  # default recovery steps per whole decoder removed (50 at 75 % kept)
MIN_STEPS = 50  # and never fewer


def recovery_steps(extraction: ExtractionConfig, kept: float) -> int:
    """The steps of recovery a cut keeping ``kept`` of the decoder's parameters gets: ``extraction.recovery_steps``
    when given, else :data:`STEPS_PER_DECODER` × the share removed, at least :data:`MIN_STEPS` (a deeper cut has
    more to make up for, and its steps cost less)."""
    if extraction.recovery_steps is not None:
        return extraction.recovery_steps
    return max(MIN_STEPS, round(STEPS_PER_DECODER * (1 - kept)))


def recover(model, tokens: torch.Tensor, num_tokens: int, seq_len: int = 128, batch_size: int = 4,
            lr: float = 5e-5, clip: float = 1.0, seed: int = 0, embeddings: bool = True,
            compute: torch.dtype | None = None, likelihood=None, progress: bool = True) -> dict:
    """Fine-tune ``model`` in place on about ``num_tokens`` tokens of ``tokens``: every parameter, or every
    one but the token embeddings (and a head tied to them) when ``embeddings`` is false.

    ``compute``: the forward pass's autocast dtype (``None``: the weights' own). ``likelihood``: what is
    minimised per token, a fit likelihood (``None``: the next-token NLL). Returns the steps, tokens,
    seconds and the loss of each step. A non-finite loss stops training with
    :class:`NonFiniteLossError` before it reaches the weights.
    """
    likelihood = likelihood or NextTokenLikelihood()
    steps = max(1, round(num_tokens / (batch_size * seq_len)))
    starts_max = tokens.numel() - seq_len
    if starts_max < 1:
        raise ValueError(f"{tokens.numel()} fit tokens are fewer than one window of {seq_len}")
    config = FitConfig(steps=steps, batch_size=batch_size, seq_len=seq_len, weights="joint", weight_lr=lr,
                       weight_decay=0.0, warmup_steps=max(1, steps // 10), schedule="cosine", clip_norm=clip,
                       seed=seed)
    frozen = set() if embeddings else {id(model.get_input_embeddings().weight)}
    trained = [p for p in model.parameters() if p.requires_grad and id(p) not in frozen]
    optimizer = make_optimizer([], 0.0, trained, config)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    weights_dtype = next(model.parameters()).dtype

    def autocast():
        if compute is None or compute == weights_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=compute)

    def step_loss(step: int):
        starts = torch.randint(0, starts_max, (batch_size,), generator=generator)
        batch = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()]).to(device)
        with autocast():
            loss = likelihood(model, batch)[0].float().sum() / (batch_size * (seq_len - 1))
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"recovery loss is {loss.item()} at step {step}")
        return loss, loss.item(), {"loss": f"{loss.item():.3f}"}

    was_training = model.training
    model.train()
    started = time.time()
    try:
        with eager_attention(model):
            losses = optimise(step_loss, optimizer, config, "recovery", progress)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return {"steps": steps, "tokens": steps * batch_size * seq_len, "seconds": time.time() - started,
            "lr": lr, "losses": losses}


def recover_cut(small, tokens: torch.Tensor, extraction: ExtractionConfig, seq_len: int, kept: float, dense=None,
                progress: bool = True) -> tuple:
    """The extraction's recovery of a cut model keeping ``kept`` of the decoder's parameters:
    :func:`recovery_steps` steps of :func:`recover` on ``tokens`` (the run's fit split), every weight but the
    token embeddings, trained in float32 with the
    forward pass at the device's native dtype, on ``extraction.recovery_likelihood``: the NLL, or the KL
    from ``dense()`` (the dense network, called only then). Its windows are drawn with one fixed seed,
    whatever the fit's, so that the cuts of two fits of the same text are fine-tuned on the same windows.
    Returns the model (float32) and what the recovery did (``None`` when it takes no steps: the model is left
    as it is)."""
    steps = recovery_steps(extraction, kept)
    if not steps:
        return small, None
    likelihood = None
    if extraction.recovery_likelihood == "distillation":
        if dense is None:
            raise ValueError("a distillation recovery needs the dense network to distil from")
        likelihood = DistillationLikelihood(NetworkTeacher(dense()))
    small = small.float()
    done = recover(small, tokens, steps * RECOVERY_BATCH * seq_len, seq_len, RECOVERY_BATCH,
                   lr=extraction.recovery_lr, seed=RECOVERY_SEED, embeddings=False,
                   compute=native_dtype(next(small.parameters()).device), likelihood=likelihood,
                   progress=progress)
    last = done["losses"][-10:]
    return small, {**{k: done[k] for k in ("steps", "tokens", "seconds", "lr")},
                   "likelihood": extraction.recovery_likelihood,
                   "first_loss": done["losses"][0], "last_loss": sum(last) / len(last)}

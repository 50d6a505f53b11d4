"""Fitting the cost-amortised guide: one cost per step, the gates straight through.

Every step reseeds from ``(seed, step)`` (cost, mini-batch and gate draws), so a fit
resumed from its checkpoint continues exactly as one that never stopped. When the
weights are trained, each step reads the units' importance from the current weights,
with its gradient: a unit's weights can grow to keep it in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch

from .amortised import CostConditionedGates, draw_cost, unit_importance
from .config import AmortisedConfig, FitConfig
from .evaluate import sequence_nll
from .fit import CHECKPOINT_FILE, make_optimizer, optimise, set_trainable, step_seed
from .gates import GatedModel
from .model import NonFiniteLossError, kept_fraction


@dataclass
class AmortisedFit:
    """A fitted cost-conditioned guide, the network it gates, and the per-step record."""

    gated: GatedModel
    gates: CostConditionedGates
    config: FitConfig
    amortised: AmortisedConfig
    sizes: dict[str, torch.Tensor]
    history: list[dict] = field(default_factory=list)


def amortised_loss(gated: GatedModel, gates: CostConditionedGates, batch: torch.Tensor, cost: float,
                   sizes: dict[str, torch.Tensor], corpus_tokens: int) -> tuple[torch.Tensor, dict]:
    """The loss per predicted token at ``cost`` for one mini-batch, and its parts."""
    draws, amplitudes, probabilities = gates.sample(cost)
    gated.set_gates(draws, amplitudes)
    try:
        nll = sequence_nll(gated, batch).sum() / (batch.shape[0] * (batch.shape[1] - 1))
    finally:
        gated.values.clear()
    expected = kept_fraction({k: p.double() for k, p in probabilities.items()}, sizes).float()
    regulariser = (gates.kl(probabilities) - gates.curve_log_prior()) / corpus_tokens
    loss = nll + cost * expected + regulariser
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"the amortised loss is {loss.item()} at cost {cost:.3f}")
    return loss, {"cost": cost, "nll": nll.item(), "expected_kept": expected.item(), "loss": loss.item()}


def fit_amortised(gated: GatedModel, sequences: torch.Tensor, config: FitConfig | None = None,
                  amortised: AmortisedConfig | None = None, run_dir: str | Path | None = None,
                  progress: bool = True) -> AmortisedFit:
    """Fit the cost-conditioned guide (and, with ``weights="joint"``, the weights) to ``sequences``.

    With ``run_dir``, a checkpoint is written every ``checkpoint_every`` steps, on an
    interrupt and at the end; a fit that finds one there resumes from it.
    """
    config = config or FitConfig()
    amortised = amortised or AmortisedConfig()
    if sequences.dim() != 2 or sequences.shape[1] < 2:
        raise ValueError(f"sequences must be (n, seq_len >= 2) token ids, got shape {tuple(sequences.shape)}")
    gated.model.eval()
    trainable = set_trainable(gated, config)
    gates = CostConditionedGates.for_model(gated, amortised)
    sizes = gated.unit_parameters()
    corpus_tokens = sequences.shape[0] * (sequences.shape[1] - 1)
    batch_size = min(config.batch_size, sequences.shape[0])
    optimizer = make_optimizer(list(gates.parameters()), amortised.lr, trainable, config)
    checkpoint = Path(run_dir) / CHECKPOINT_FILE if run_dir is not None else None

    def step_loss(step: int):
        pyro.set_rng_seed(step_seed(config.seed, step))
        if trainable:
            gates.set_importance(unit_importance(gated, track=True))
        cost = draw_cost(amortised)
        batch = sequences[torch.randperm(sequences.shape[0])[:batch_size]]
        loss, record = amortised_loss(gated, gates, batch, cost, sizes, corpus_tokens)
        return loss, record, {"cost": f"{cost:.2f}", "nll": f"{record['nll']:.3f}",
                              "kept": f"{record['expected_kept']:.2f}"}

    history = optimise(step_loss, gates, optimizer, gated, config, checkpoint, "amortised SVI", progress)
    if trainable:
        gates.set_importance(unit_importance(gated))
    return AmortisedFit(gated, gates, config, amortised, sizes, history)

"""Cost-conditioned inclusion: every unit's inclusion probability and output amplitude as a function of the cost.

For unit ``u`` of kind ``k`` in layer ``ℓ`` at cost ``λ``, with ``t = λ / (1 + λ)``::

    logit_u(λ)     = (importance_u · amplitude_u(λ) + offset_u − threshold_{ℓ,k}(λ)) / T
    threshold_ℓ,k  = monotone clamped cubic B-spline in t, control increments
                     softplus(shared_k + deviation_{ℓ,k}), first control point threshold_start
    amplitude_u(λ) = exp(log_amplitude_u · g_k(t)),  g_k a B-spline with g_k(0) = 0 pinned

``importance_u`` is the L2 norm of the weights a unit owns over its layer's mean (1
for block and branch gates, which own a whole layer's part). The parameters (``θ``:
shared curves, deviations, offsets, log-amplitudes, amplitude curves) are the
latent variables of :mod:`bayesprune.core.model`; everything here takes them with any
leading draw dimensions. At ``λ = 0`` every probability and amplitude is exactly 1:
the network is the dense one, whatever ``θ``.
"""

from __future__ import annotations

import math

import torch

from .config import PriorConfig
from .gates import GatedModel
from .kinds import layer_kinds, width_kinds
from .removal import removal_scores
from .sizes import unit_norms
from .splines import curve_at, monotone_controls, pinned_controls

Theta = dict[str, torch.Tensor]


def cost_position(cost: float) -> float:
    """Where the cost sits on the curves' axis: ``λ / (1 + λ)`` ∈ [0, 1)."""
    if not math.isfinite(cost) or cost < 0:
        raise ValueError(f"a cost must be finite and >= 0, got {cost}")
    return cost / (1 + cost)


def unit_importance(gated: GatedModel, track: bool = False) -> dict[str, torch.Tensor]:
    """Per kind: weight norm of each unit over its layer's mean (width kinds), or ones (block and branch kinds).

    With ``track``, the norms are differentiable in the current weights (a fit that
    trains the weights reads them afresh every step); otherwise they are constants.
    """
    device = next(gated.model.parameters()).device
    importance = {k: torch.ones(gated.num_layers, device=device) for k in layer_kinds(gated.kinds)}
    if width_kinds(gated.kinds):
        with gated.unwrapped() as model, torch.set_grad_enabled(track):
            norms = unit_norms(model, gated.kinds, torch.float32)
        for kind in width_kinds(gated.kinds):
            importance[kind] = norms[kind] / norms[kind].mean(-1, keepdim=True)
    return importance


def removal_importance(gated: GatedModel, windows: torch.Tensor) -> torch.Tensor:
    """Per block: the rise in NLL on ``windows`` when that block alone is removed
    (:func:`~bayesprune.core.removal.removal_scores`), over the mean rise.

    Data-driven importance for block gates (where weight norms say nothing), measured once
    with every other gate open.
    """
    rise = removal_scores(gated, windows)
    return (rise / rise.abs().mean().clamp_min(1e-12)).to(next(gated.model.parameters()).device)


def thresholds(theta: Theta, kind: str, cost: float, prior: PriorConfig) -> torch.Tensor:
    """Each layer's threshold for ``kind`` at ``cost``: ``(..., layer)``."""
    raw = theta[f"{kind}_threshold_curve"][..., None, :] + theta[f"{kind}_deviation"]
    return curve_at(monotone_controls(prior.threshold_start, raw), cost_position(cost))


def amplitude(theta: Theta, kind: str, cost: float, unit_dims: int) -> torch.Tensor | None:
    """Output amplitude of every unit of ``kind`` at ``cost`` (``None``: the kind has none, as blocks)."""
    log_amplitude = theta.get(f"{kind}_log_amplitude")
    if log_amplitude is None:
        return None
    if cost == 0:
        return torch.ones_like(log_amplitude)
    g = curve_at(pinned_controls(0.0, theta[f"{kind}_amplitude_curve"]), cost_position(cost))
    return torch.exp(log_amplitude * g.reshape(g.shape + (1,) * unit_dims))


def logits(theta: Theta, kind: str, importance: torch.Tensor, cost: float, prior: PriorConfig) -> torch.Tensor:
    """Inclusion logits of every unit of ``kind`` at a cost above 0: ``(..., layer[, unit])``."""
    unit_dims = importance.dim()
    drive = importance
    scale = amplitude(theta, kind, cost, unit_dims)
    if scale is not None:
        drive = drive * scale
    offset = theta.get(f"{kind}_offset")
    if offset is not None:
        drive = drive + offset
    threshold = thresholds(theta, kind, cost, prior)
    if unit_dims == 2:
        threshold = threshold[..., None]
    return (drive - threshold) / prior.temperature


def probabilities(theta: Theta, importance: dict[str, torch.Tensor], cost: float,
                  prior: PriorConfig) -> dict[str, torch.Tensor]:
    """Inclusion probability of every unit of every kind at ``cost``; exactly 1 at cost 0."""
    if cost == 0:
        lead = theta[f"{next(iter(importance))}_threshold_curve"].shape[:-1]
        return {k: torch.ones(lead + v.shape, device=v.device) for k, v in importance.items()}
    return {k: torch.sigmoid(logits(theta, k, v, cost, prior)) for k, v in importance.items()}


def amplitudes(theta: Theta, importance: dict[str, torch.Tensor], cost: float) -> dict[str, torch.Tensor]:
    """Output amplitudes of every kind that has them (not blocks) at ``cost``."""
    found = {k: amplitude(theta, k, cost, v.dim()) for k, v in importance.items()}
    return {k: v for k, v in found.items() if v is not None}


def block_on_probability(on: dict[str, torch.Tensor], one: torch.Tensor) -> torch.Tensor:
    """Probability that a block contributes at all, from its layer-kind inclusion probabilities.

    A block is gone when its block gate is off, or when every branch gated inside it
    is off; kinds without gates count as on. ``one`` has the shape of the result.
    """
    if {"attn", "mlp"} & set(on):
        branches_off = (1 - on.get("attn", one)) * (1 - on.get("mlp", one))
    else:
        branches_off = torch.zeros_like(one)
    return on.get("block", one) * (1 - branches_off)

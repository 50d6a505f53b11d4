"""Cost-amortised gates (push puppet): one fit whose guide answers for every cost.

The model at cost ``λ`` is the pruning model of :mod:`bayesprune.model` with its
compute factor ``exp(−λ · N · C(z))``. Instead of one fit per ``λ``, the guide is
amortised over ``λ``: each step draws ``λ`` (0 with probability 1/3, else
Exponential(0.3)) and the gates from

    q(z_u = 1 | λ) = σ((importance_u · amplitude_u(λ) − threshold_{ℓ,kind}(λ)) / T)

* ``importance_u``: the L2 norm of the weights a unit owns, over its layer's mean
  (1 for blocks and branches, which own a whole layer's part); read from the
  current weights at every step when they are trained with the gates;
* ``threshold_{ℓ,kind}``: a monotone clamped B-spline in ``t = λ / (1 + λ)`` per
  layer and kind, a shared curve per kind plus layer deviations that the
  hierarchical prior ``Normal(0, σ_kind)``, ``σ²_kind ~ InverseGamma(2, s²)``, shrinks
  to it (``σ`` is integrated out: a multivariate Student-t, so the point estimate
  has no funnel at ``σ → 0``);
* ``amplitude_u(λ) = exp(s_u · g_kind(t))`` with ``g_kind(0) = 0`` pinned: what a
  kept unit writes is scaled by it (heads, neurons and branches; a whole block's
  update cannot be folded into weights, so blocks carry none);
* unless ``offset_scale`` is 0, a learned per-unit offset ``b_u ~ Normal(0, offset_scale)``
  added to ``importance_u · amplitude_u``: units rank by more than their norms
  without their outputs having to change.

At ``λ = 0`` every gate is on and every amplitude is exactly 1: the network is the
dense one, whatever the parameters. Per predicted token the loss is

    NLL(z, amplitudes) + λ · E_q[C(z)] + (KL(q(z | λ) ‖ Bernoulli(π)) − log p(curves)) / N

with the gates drawn straight through (``z + ρ − stop_gradient(ρ)``) and the
expected kept fraction ``E_q[C]`` computed exactly from the nested probabilities.
The optimiser applies no weight decay to any guide parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .architectures import unit_norms
from .config import WIDTH_KINDS, AmortisedConfig
from .gates import GatedModel


def cost_position(cost: float) -> float:
    """Where the cost sits on the curves' axis: ``λ / (1 + λ)`` ∈ [0, 1)."""
    if cost < 0 or not math.isfinite(cost):
        raise ValueError(f"a cost must be finite and >= 0, got {cost}")
    return cost / (1 + cost)


def draw_cost(config: AmortisedConfig) -> float:
    """One cost from the training distribution, with torch's global generator."""
    if torch.rand(()).item() < config.zero_probability:
        return 0.0
    return float(torch.empty(()).exponential_(config.rate))


def unit_importance(gated: GatedModel, track: bool = False) -> dict[str, torch.Tensor]:
    """Per kind: weight norm of each unit over its layer's mean (head, neuron), or ones (layer kinds).

    With ``track``, the norms are differentiable in the current weights (a fit that
    trains the weights reads them afresh every step); otherwise they are constants.
    """
    importance = {k: torch.ones(gated.num_layers) for k in gated.kinds if k not in WIDTH_KINDS}
    if set(gated.kinds) & set(WIDTH_KINDS):
        with gated.unwrapped() as model, torch.set_grad_enabled(track):
            norms = unit_norms(model, torch.float32)
        for kind in WIDTH_KINDS:
            if kind in gated.kinds:
                importance[kind] = norms[kind] / norms[kind].mean(-1, keepdim=True)
    return importance


class CostConditionedGates(nn.Module):
    """The amortised guide: inclusion probabilities and amplitudes of every unit as functions of the cost."""

    def __init__(self, importance: dict[str, torch.Tensor], config: AmortisedConfig):
        super().__init__()
        from .splines import MonotoneCurves, PinnedCurves

        self.kinds = tuple(importance)
        self.config = config
        count = config.control_points
        for kind, values in importance.items():
            self.register_buffer(f"importance_{kind}", values.float())
        self.thresholds = nn.ModuleDict({k: MonotoneCurves((), count, config.threshold_start, config.threshold_rise)
                                         for k in self.kinds})
        num_layers = next(iter(importance.values())).shape[0]
        self.deviations = nn.ParameterDict({k: nn.Parameter(torch.zeros(num_layers, count - 1)) for k in self.kinds})
        scaled = [k for k in self.kinds if k != "block"]
        self.log_amplitudes = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(importance[k], dtype=torch.float32))
                                                for k in scaled})
        self.amplitude_curves = nn.ModuleDict({k: PinnedCurves((), count, 0.0, 1.0) for k in scaled})
        self.offsets = nn.ParameterDict({k: nn.Parameter(torch.zeros_like(importance[k], dtype=torch.float32))
                                         for k in (self.kinds if config.offset_scale > 0 else ())})

    @classmethod
    def for_model(cls, gated: GatedModel, config: AmortisedConfig | None = None) -> "CostConditionedGates":
        return cls(unit_importance(gated), config or AmortisedConfig())

    def importance(self, kind: str) -> torch.Tensor:
        return getattr(self, f"importance_{kind}")

    def set_importance(self, importance: dict[str, torch.Tensor]) -> None:
        """Replace every kind's importance (weights changed), keeping any gradient it carries."""
        for kind in self.kinds:
            setattr(self, f"importance_{kind}", importance[kind].float())

    def threshold(self, kind: str, cost: float) -> torch.Tensor:
        """Each layer's threshold for ``kind`` at ``cost``: ``(layer,)``."""
        return self.thresholds[kind](cost_position(cost), offsets=self.deviations[kind])

    def amplitude(self, kind: str, cost: float) -> torch.Tensor | None:
        """Output amplitude of every unit of ``kind`` at ``cost`` (``None`` for blocks: always 1)."""
        if kind not in self.log_amplitudes:
            return None
        if cost == 0:
            return torch.ones_like(self.log_amplitudes[kind])
        return torch.exp(self.log_amplitudes[kind] * self.amplitude_curves[kind](cost_position(cost)))

    def logits(self, kind: str, cost: float) -> torch.Tensor:
        """Inclusion logits of every unit of ``kind`` at a cost above 0."""
        drive = self.importance(kind)
        amplitude = self.amplitude(kind, cost)
        if amplitude is not None:
            drive = drive * amplitude
        if kind in self.offsets:
            drive = drive + self.offsets[kind]
        threshold = self.threshold(kind, cost)
        if kind in WIDTH_KINDS:
            threshold = threshold[:, None]
        return (drive - threshold) / self.config.temperature

    def probabilities(self, cost: float) -> dict[str, torch.Tensor]:
        """Inclusion probability of every unit at ``cost``; exactly 1 at cost 0."""
        if cost == 0:
            return {k: torch.ones_like(self.importance(k)) for k in self.kinds}
        return {k: torch.sigmoid(self.logits(k, cost)) for k in self.kinds}

    def sample(self, cost: float) -> tuple[dict, dict, dict]:
        """Straight-through gate draws, amplitudes and probabilities at ``cost`` (torch's global generator)."""
        probabilities = self.probabilities(cost)
        gates = {k: p + (torch.bernoulli(p.detach()) - p).detach() for k, p in probabilities.items()}
        amplitudes = {k: self.amplitude(k, cost) for k in self.kinds if k in self.log_amplitudes}
        return gates, amplitudes, probabilities

    def kl(self, probabilities: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ KL(Bernoulli(ρ) ‖ Bernoulli(π)) over every unit."""
        prior = self.config.prior_inclusion
        total = torch.zeros(())
        for p in probabilities.values():
            p = p.clamp(1e-6, 1 - 1e-6)
            total = total + (p * torch.log(p / prior) + (1 - p) * torch.log((1 - p) / (1 - prior))).sum()
        return total

    def curve_log_prior(self) -> torch.Tensor:
        """log p of the layer deviations from each kind's shared threshold curve (``σ_kind`` integrated
        out) and of the unit offsets, up to a constant."""
        shape, rate = 2.0, self.config.curve_scale ** 2
        total = torch.zeros(())
        for deviations in self.deviations.values():
            n = deviations.numel()
            total = total + (math.lgamma(shape + n / 2) - math.lgamma(shape) - n / 2 * math.log(2 * math.pi * rate)
                             - (shape + n / 2) * torch.log1p(deviations.pow(2).sum() / (2 * rate)))
        for offsets in self.offsets.values():
            total = total - offsets.pow(2).sum() / (2 * self.config.offset_scale ** 2)
        return total

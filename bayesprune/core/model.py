"""The generative model: a cost-conditioned hierarchical shrinkage prior on the gates, a compute cost, the LM likelihood.

After Kubinec (2026), *Push Puppet Networks* (arXiv 2606.28251), written as one Pyro
model conditioned on the cost ``λ`` (nats of loss per token traded for the whole
network). For each gated unit kind ``k`` (block, attn, mlp, head, neuron), with
``c`` spline control points and ``t = λ / (1 + λ)``:

*global level* (per kind)::

    shared_k        ~ Normal(rise increments, shared_curve_scale)        # (c−1,) threshold curve
    g_k             ~ Normal(linear, 1)                                  # (c−1,) amplitude curve, g_k(0) = 0
    global_scale_k  ~ HalfCauchy(curve_scale)                            # ()

*layer level* (horseshoe: a few layers may stand out, the rest shrink to the shared curve)::

    local_scale_k,ℓ ~ HalfCauchy(1)                                      # (layer,)
    deviation_k,ℓ   ~ Normal(0, global_scale_k · local_scale_k,ℓ)        # (layer, c−1)

*unit level*::

    offset_u        ~ Normal(μ_u, offset_scale)                          # (layer[, unit])
    log_amplitude_u ~ Normal(0, amplitude_scale)                         # (layer[, unit]); not for blocks

``μ_u`` is 0, or ``threshold_rise`` for a *critical* unit (one whose removal alone breaks the network:
:func:`bayesprune.core.removal.critical_units`), which then clears the prior's threshold curve at every cost.

*gates*: ``z_u ~ Bernoulli(σ(logit_u(λ)))`` with the cost-conditioned logits of
:mod:`bayesprune.core.inclusion` (threshold ``= spline(softplus(shared_k + deviation_k,ℓ))``,
importance from the weight norms, amplitudes ``exp(log_amplitude_u · g_k(t))``),
drawn straight through: exact 0/1 in the forward pass, the gradient of the
probability in the backward pass. The guide draws the gates from this same
conditional, so they enter the ELBO through the likelihood only (recorded with
``pyro.deterministic``).

*cost*: ``factor(−λ · N · C(ρ))`` with ``C`` the fraction of decoder parameters kept,
counted from the real weights of every unit and only under open ancestors
(:class:`bayesprune.core.sizes.UnitSizes`), at the inclusion probabilities ``ρ``: ``C`` is
multilinear in independent gates, so this is ``E[C(z)]`` exactly (the tilt
``exp(−λ N C(z))`` averaged over the gates, without its sampling noise). ``N`` is the
number of predicted tokens in the corpus.

*likelihood*: ``factor(−NLL(sequence | z, amplitudes))`` per sequence in a plate
subsampled from the corpus, so the prior and the cost keep their meaning at any
mini-batch size; or, for distillation, ``KL(p_dense ‖ p_gated)`` summed over the
sequence in place of the NLL (:mod:`bayesprune.core.likelihood`). A fixed-cost fit is this
model with ``λ`` held fixed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from . import inclusion
from .config import PriorConfig
from .gates import GatedModel
from .likelihood import NextTokenLikelihood
from .splines import rising_increments


class NonFiniteLossError(FloatingPointError):
    """The ELBO became NaN or infinite."""


@dataclass(frozen=True)
class Site:
    """One latent variable: its name, event shape, support and the value the guide starts at."""

    name: str
    shape: tuple[int, ...]
    positive: bool
    start: torch.Tensor


class ShrinkagePrior:
    """The hierarchical prior over the inclusion parameters ``θ``; subclass it to change a level.

    :meth:`sites` says what is latent, :meth:`distribution` how each site is
    distributed given the ones before it, so the guide and the posterior need no
    other knowledge of the prior.
    """

    def __init__(self, config: PriorConfig, kinds: tuple[str, ...], num_layers: int, units: dict[str, int],
                 device: torch.device | str = "cpu"):
        self.config = config
        self.kinds = kinds
        self.num_layers = num_layers
        self.units = units
        self.device = torch.device(device)
        self.offset_means: dict[str, torch.Tensor] = {}  # per kind, where critical units are protected

    def protect(self, critical: dict[str, torch.Tensor]) -> None:
        """Centre the offsets of the ``critical`` units (per kind, a ``(layer, unit)`` mask) at ``threshold_rise``."""
        if self.config.offset_scale > 0:
            self.offset_means = {k: m.to(self.device).float() * self.config.threshold_rise
                                 for k, m in critical.items() if m.any()}

    def offset_mean(self, kind: str) -> torch.Tensor:
        return self.offset_means.get(kind, self._zeros(self.unit_shape(kind)))

    def _zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, device=self.device)

    def unit_shape(self, kind: str) -> tuple[int, ...]:
        return (self.num_layers, self.units[kind]) if kind in self.units else (self.num_layers,)

    def sites(self) -> list[Site]:
        c, L = self.config, self.num_layers
        free = c.control_points - 1
        sites = []
        for kind in self.kinds:
            rise = rising_increments(c.control_points, c.threshold_rise).to(self.device)
            sites += [Site(f"{kind}_threshold_curve", (free,), False, rise),
                      Site(f"{kind}_global_scale", (), True, torch.tensor(c.curve_scale, device=self.device)),
                      Site(f"{kind}_local_scale", (L,), True, torch.ones(L, device=self.device)),
                      Site(f"{kind}_deviation", (L, free), False, self._zeros((L, free)))]
            if c.offset_scale > 0:
                sites.append(Site(f"{kind}_offset", self.unit_shape(kind), False, self.offset_mean(kind)))
            if kind != "block":  # a whole block's update cannot be folded into weights
                sites += [Site(f"{kind}_log_amplitude", self.unit_shape(kind), False,
                               self._zeros(self.unit_shape(kind))),
                          Site(f"{kind}_amplitude_curve", (free,), False,
                               torch.linspace(0, 1, c.control_points, device=self.device)[1:])]
        return sites

    def distribution(self, site: Site, theta: inclusion.Theta) -> dist.Distribution:
        """The prior of ``site`` given the sites drawn before it (``theta``)."""
        c = self.config
        kind, _, part = site.name.partition("_")
        if part == "threshold_curve":
            base = dist.Normal(site.start, c.shared_curve_scale)
        elif part == "global_scale":
            base = dist.HalfCauchy(torch.tensor(c.curve_scale, device=self.device))
        elif part == "local_scale":
            base = dist.HalfCauchy(torch.ones(site.shape, device=self.device))
        elif part == "deviation":
            scale = theta[f"{kind}_global_scale"][..., None] * theta[f"{kind}_local_scale"]
            base = dist.Normal(self._zeros(site.shape), scale[..., None].expand(scale.shape + site.shape[-1:]))
        elif part == "offset":
            base = dist.Normal(self.offset_mean(kind), c.offset_scale)
        elif part == "log_amplitude":
            base = dist.Normal(self._zeros(site.shape), c.amplitude_scale)
        elif part == "amplitude_curve":
            base = dist.Normal(site.start, 1.0)
        else:
            raise KeyError(f"no prior for site {site.name}")
        return base.to_event(len(site.shape)) if site.shape else base

    def sample(self) -> inclusion.Theta:
        theta: inclusion.Theta = {}
        for site in self.sites():
            theta[site.name] = pyro.sample(site.name, self.distribution(site, theta))
        return theta


class PruningModel(nn.Module):
    """The Pyro model over a gated network and a fixed set of token windows: ``model(batch, cost)``."""

    def __init__(self, gated: GatedModel, sequences: torch.Tensor, prior: ShrinkagePrior | PriorConfig,
                 track_importance: bool = False, two_point_blocks: int = 0, likelihood=None):
        super().__init__()
        self.gated = gated
        self.likelihood = likelihood or NextTokenLikelihood()  # (gated, sequences) → (factor value, NLL)
        self.sequences = sequences  # token windows stay where they are; each mini-batch moves to the model
        self.device = next(gated.model.parameters()).device
        if isinstance(prior, PriorConfig):
            prior = ShrinkagePrior(prior, gated.kinds, gated.num_layers, gated.values.units, self.device)
        self.prior = prior
        self.sizes = gated.unit_parameters().to(self.device)
        self.num_sequences = sequences.shape[0]
        self.num_tokens = sequences.shape[0] * (sequences.shape[1] - 1)
        self.track_importance = track_importance
        self.two_point_blocks = min(two_point_blocks, gated.num_layers) if "block" in gated.kinds else 0
        self.block_importance: torch.Tensor | None = None  # data-driven block importance, if measured
        self.importance = inclusion.unit_importance(gated)
        self.last_step: dict[str, float] = {}  # NLL per token and expected kept fraction of the latest call

    def forward(self, batch: torch.Tensor, cost: float) -> None:
        theta = self.prior.sample()
        if self.track_importance:  # trained weights: a unit's weights can grow to keep it in
            self.refresh_importance(track=True)
        p = inclusion.probabilities(theta, self.importance, cost, self.prior.config)
        broken = [k for k, v in p.items() if not torch.isfinite(v).all()]
        if broken:
            raise NonFiniteLossError(f"the inclusion probabilities of {broken} are not finite "
                                     f"(non-finite weights make non-finite unit importance)")
        drawn = {k: torch.bernoulli(v.detach()) for k, v in p.items()}
        gates = {k: pyro.deterministic(f"{k}_gate", drawn[k] if k == "block" and self.two_point_blocks
                                       else v + (drawn[k] - v).detach())        # straight through
                 for k, v in p.items()}
        expected = self.sizes.kept_fraction(p).float()
        pyro.factor("cost", -cost * self.num_tokens * expected)
        with pyro.plate("sequences", self.num_sequences, subsample=batch), \
                self.gated.gates_set(gates, inclusion.amplitudes(theta, self.importance, cost)):
            value, nll = self.likelihood(self.gated, self.sequences[batch].to(self.device))   # (batch,) each
            if not torch.isfinite(value).all():
                raise NonFiniteLossError(f"the network's log-likelihood is not finite on sequences "
                                         f"{batch[~torch.isfinite(value).cpu()].tolist()}")
            pyro.factor("likelihood", -value)
            if self.two_point_blocks:
                pyro.factor("block_two_point", self._two_point(p["block"], drawn["block"], batch, value.detach()))
        per_token = len(batch) * (self.sequences.shape[1] - 1)
        self.last_step = {"nll": nll.sum().item() / per_token, "likelihood": value.sum().item() / per_token,
                          "expected_kept": expected.item()}

    @contextlib.contextmanager
    def scoring(self, windows: torch.Tensor):
        """Within the block, mini-batches index ``windows`` (validation windows) in place of the fit's, with the
        ELBO still scaled to the fit's corpus."""
        fitted, self.sequences = self.sequences, windows
        try:
            yield self
        finally:
            self.sequences = fitted

    def refresh_importance(self, track: bool = False) -> None:
        """Read the units' importance from the current weights (blocks keep a measured importance)."""
        self.importance = inclusion.unit_importance(self.gated, track=track)
        if self.block_importance is not None:
            self.importance["block"] = self.block_importance

    def _two_point(self, p: torch.Tensor, drawn: torch.Tensor, batch: torch.Tensor, nll: torch.Tensor) -> torch.Tensor:
        """The block gates' gradient by local expectation: zero in value, with gradient ``−Δ_b`` per sequence
        for ``two_point_blocks`` blocks drawn at random (scaled up to all of them), where
        ``Δ_b = NLL(block b on) − NLL(block b off)`` with every other gate as drawn.

        A straight-through gradient is the NLL's slope at the drawn gate, a poor stand-in
        for what removing a whole block does; this is the exact difference instead, at one
        extra forward pass (no backward) per block drawn.
        """
        chosen = torch.randperm(self.gated.num_layers)[:self.two_point_blocks].tolist()
        surrogate = torch.zeros_like(nll)
        with torch.no_grad():
            deltas = []
            for b in chosen:
                flipped = drawn.clone()
                flipped[b] = 1 - drawn[b]
                with self.gated.gates_set({"block": flipped}):
                    other = self.likelihood(self.gated, self.sequences[batch].to(self.device))[0]
                deltas.append(nll - other if drawn[b] == 1 else other - nll)       # (batch,)
        for b, delta in zip(chosen, deltas):
            surrogate = surrogate - (p[b] - p[b].detach()) * delta
        return surrogate * (self.gated.num_layers / len(chosen))

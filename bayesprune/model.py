"""The generative model: hierarchical shrinkage prior on gates, a compute cost, the LM likelihood.

After Kubinec (2026), *Push Puppet Networks: Structured Bayesian Pruning Algorithm
for Language Model Compression* (arXiv 2606.28251), written as a Pyro model. For
each unit kind ``k`` with one unit per decoder layer (block, attn, mlp)::

    mean_logit_k    ~ Normal(mean_logit_loc, mean_logit_scale)         # ()
    global_scale_k  ~ HalfCauchy(global_scale)                          # ()
    local_scale_k,l ~ HalfCauchy(1)                                     # (layer,)
    logit_k,l       ~ Normal(mean_logit_k, global_scale_k·local_scale_k,l)
    gate_k,l        =  straight-through relaxed Bernoulli(logit_k,l)    # exact 0/1 forward

and for the width kinds (head, neuron), with many units per layer, one more level
so that the units of a layer share a layer mean::

    layer_scale_k     ~ HalfCauchy(global_scale)                        # ()
    layer_logit_k,l   ~ Normal(mean_logit_k, layer_scale_k)             # (layer, 1)
    local_scale_k,l,u ~ HalfCauchy(1)                                   # (layer, unit)
    logit_k,l,u       ~ Normal(layer_logit_k,l, global_scale_k·local_scale_k,l,u)

then ``factor(-cost · N · C(gate))`` with ``C`` the fraction of decoder parameters
kept, counted from the real weights each unit carries and only when its ancestors
are on (``N`` = predicted tokens in the corpus, so ``cost`` is in nats per token for
the whole network) and ``factor(-NLL(sequence | gates))`` for each sequence,
scaled from the mini-batch to the corpus by a subsampled plate.

The gate draw is a reparameterised transform of the logit (``q(gate | logit) =
p(gate | logit)``), so it is recorded with ``pyro.deterministic`` rather than as a
sample site: the ELBO is ``E_q[log p(data | gates)] - KL`` over the continuous sites.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from .config import PriorConfig
from .evaluate import sequence_nll
from .gates import GatedModel


class NonFiniteLossError(FloatingPointError):
    """The ELBO became NaN or infinite."""


class ShrinkagePrior:
    """Horseshoe-type prior on the inclusion logits of one unit kind; override to swap it."""

    def __init__(self, config: PriorConfig):
        self.config = config

    def sample_logits(self, kind: str, num_layers: int, num_units: int | None = None) -> torch.Tensor:
        """Logits ``(layer,)``, or ``(layer, unit)`` with ``num_units``."""
        c = self.config
        mean_logit = pyro.sample(f"{kind}_mean_logit", dist.Normal(c.mean_logit_loc, c.mean_logit_scale))
        global_scale = pyro.sample(f"{kind}_global_scale", dist.HalfCauchy(torch.tensor(c.global_scale)))
        if num_units is None:
            with pyro.plate(f"{kind}_units", num_layers, dim=-1):
                local_scale = pyro.sample(f"{kind}_local_scale", dist.HalfCauchy(torch.ones(())))
                return pyro.sample(f"{kind}_logit", dist.Normal(mean_logit, global_scale * local_scale))
        layer_scale = pyro.sample(f"{kind}_layer_scale", dist.HalfCauchy(torch.tensor(c.global_scale)))
        with pyro.plate(f"{kind}_layers", num_layers, dim=-2):
            layer_logit = pyro.sample(f"{kind}_layer_logit", dist.Normal(mean_logit, layer_scale))
            with pyro.plate(f"{kind}_units", num_units, dim=-1):
                local_scale = pyro.sample(f"{kind}_local_scale", dist.HalfCauchy(torch.ones(())))
                return pyro.sample(f"{kind}_logit", dist.Normal(layer_logit, global_scale * local_scale))


def kept_parameters(gates: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decoder parameters whose units are on, a unit counting only when its ancestors are on.

    ``sizes`` is :meth:`GatedModel.unit_parameters` (per layer: ``other``, fixed
    ``attn`` / ``mlp`` parts, parameters per ``head`` / ``neuron``, and the unit
    counts ``heads`` / ``neurons``). A missing gate kind counts as always on;
    gates may carry leading draw dimensions.
    """
    one = torch.ones((), dtype=torch.float64)
    heads = gates["head"].sum(-1) if "head" in gates else sizes["heads"]
    neurons = gates["neuron"].sum(-1) if "neuron" in gates else sizes["neurons"]
    attn = gates.get("attn", one) * (sizes["attn"] + sizes["head"] * heads)
    mlp = gates.get("mlp", one) * (sizes["mlp"] + sizes["neuron"] * neurons)
    return (gates.get("block", one) * (sizes["other"] + attn + mlp)).sum(-1)


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


def kept_fraction(gates: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor]) -> torch.Tensor:
    """C(z): the fraction of decoder parameters that :func:`kept_parameters` keeps."""
    return kept_parameters(gates, sizes) / kept_parameters({}, sizes)


class PruningModel:
    """The Pyro model over a gated network and a fixed set of token windows."""

    def __init__(self, gated: GatedModel, sequences: torch.Tensor, prior: PriorConfig,
                 shrinkage: ShrinkagePrior | None = None):
        self.gated = gated
        self.sequences = sequences
        self.prior = prior
        self.shrinkage = shrinkage or ShrinkagePrior(prior)
        self.sizes = gated.unit_parameters()
        self.num_tokens = sequences.shape[0] * (sequences.shape[1] - 1)

    def sample_gates(self) -> dict[str, torch.Tensor]:
        gates = {}
        for kind in self.gated.kinds:
            logit = self.shrinkage.sample_logits(kind, self.gated.num_layers, self.gated.values.units.get(kind))
            draw = dist.RelaxedBernoulliStraightThrough(
                torch.tensor(self.prior.temperature), logits=logit).rsample()
            gates[kind] = pyro.deterministic(f"{kind}_gate", draw)
        return gates

    def __call__(self, batch: torch.Tensor) -> None:
        gates = self.sample_gates()
        kept = kept_fraction({k: g.double() for k, g in gates.items()}, self.sizes).float()
        pyro.factor("cost", -self.prior.cost * self.num_tokens * kept)
        self.gated.set_gates(gates)
        with pyro.plate("sequences", self.sequences.shape[0], subsample=batch):
            nll = sequence_nll(self.gated, self.sequences[batch])                        # (batch,)
            if not torch.isfinite(nll).all():
                raise NonFiniteLossError(f"the network's log-likelihood is not finite on sequences "
                                         f"{batch[~torch.isfinite(nll)].tolist()}")
            pyro.factor("likelihood", -nll)

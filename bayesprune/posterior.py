"""Posterior summaries from guide draws: inclusion probabilities, rankings, InferenceData.

Two different uncertainties are reported and kept apart:

* ``{kind}_inclusion`` is the probability that a unit's gate is on, ``σ(logit)``;
  its mean is the *posterior inclusion probability*.
* the spread of ``σ(logit)`` over posterior draws (credible interval) is the
  uncertainty *about* that probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro import poutine

from .io import load_tensors, save_tensors
from .model import kept_fraction

POSTERIOR_FILE = "posterior.safetensors"


@dataclass
class GatePosterior:
    """Draws of every latent site of the gate model, ``(draw, ...)``, with unit names."""

    kinds: tuple[str, ...]
    layer_names: list[str]
    draws: dict[str, torch.Tensor]
    sizes: dict[str, torch.Tensor]

    @classmethod
    def from_guide(cls, guide, model, batch: torch.Tensor, num_draws: int) -> "GatePosterior":
        """Draw ``num_draws`` joint samples of the guide's latent sites at once."""
        with torch.no_grad(), pyro.plate("draws", num_draws, dim=-2):
            trace = poutine.trace(guide).get_trace(batch)
        draws = {name: trace.nodes[name]["value"].reshape((num_draws,) + site["value"].shape).detach()
                 for name, site in guide.prototype_trace.iter_stochastic_nodes()}
        return cls(model.gated.kinds, list(model.gated.layer_names), draws, model.sizes)

    @property
    def num_draws(self) -> int:
        return next(iter(self.draws.values())).shape[0]

    def inclusion(self, kind: str) -> torch.Tensor:
        """``σ(logit)`` per draw, ``(draw, layer)``."""
        return torch.sigmoid(self.draws[f"{kind}_logit"])

    def block_keep_probability(self) -> torch.Tensor:
        """Per draw, the probability that a block contributes at all, ``(draw, layer)``.

        A block is gone when its block gate is off, or when every branch gated
        inside it is off; kinds without gates count as on.
        """
        on = {k: self.inclusion(k) for k in self.kinds}
        one = torch.ones_like(next(iter(on.values())))
        if {"attn", "mlp"} & set(self.kinds):
            branches_off = (1 - on.get("attn", one)) * (1 - on.get("mlp", one))
        else:
            branches_off = torch.zeros_like(one)
        return on.get("block", one) * (1 - branches_off)

    def ranking(self) -> list[int]:
        """Layer indices from most to least likely to be kept (posterior means)."""
        return torch.argsort(self.block_keep_probability().mean(0), descending=True, stable=True).tolist()

    def removal_probability(self) -> torch.Tensor:
        """``P[l, k]``: posterior probability that block ``l`` is among the ``k`` removed first.

        Over draws, blocks are ordered by their keep probability in that draw;
        ``k`` runs from 0 to the number of layers.
        """
        keep = self.block_keep_probability()                                   # (draw, layer)
        ranks = torch.argsort(torch.argsort(keep, dim=1, stable=True), dim=1)  # 0 = removed first
        k = torch.arange(keep.shape[1] + 1)
        return (ranks[:, :, None] < k).float().mean(0)                        # (layer, k)

    def kept_fraction_draws(self, seed: int = 0) -> torch.Tensor:
        """Fraction of decoder parameters kept by hard gate draws, one per posterior draw."""
        generator = torch.Generator().manual_seed(seed)
        gates = {k: torch.bernoulli(self.inclusion(k).double(), generator=generator) for k in self.kinds}
        return kept_fraction(gates, self.sizes)

    def to_inference_data(self):
        """ArviZ ``InferenceData``: one chain, dims named after structure, real module names."""
        import arviz as az

        posterior, dims = {}, {}
        for kind in self.kinds:
            for name in ("logit", "local_scale"):
                posterior[f"{kind}_{name}"] = self.draws[f"{kind}_{name}"].numpy()[None]
                dims[f"{kind}_{name}"] = ["layer"]
            posterior[f"{kind}_inclusion"] = self.inclusion(kind).numpy()[None]
            dims[f"{kind}_inclusion"] = ["layer"]
            for name in ("mean_logit", "global_scale"):
                posterior[f"{kind}_{name}"] = self.draws[f"{kind}_{name}"].numpy()[None]
        posterior["kept_fraction"] = self.kept_fraction_draws().numpy()[None]
        return az.from_dict(posterior=posterior, dims=dims, coords={"layer": self.layer_names},
                            attrs={"inference_library": "pyro", "method": "SVI (bayesprune)"})

    def summary(self) -> list[dict]:
        """Per block: inclusion mean, 94 % HDI, rank and probability of removal at its rank."""
        import arviz as az

        keep = self.block_keep_probability().numpy()
        mean = keep.mean(0)
        hdi = az.hdi(keep[None], hdi_prob=0.94)  # (layer, 2)
        removal = self.removal_probability()
        order = np.argsort(-mean, kind="stable")
        rows = []
        for rank, layer in enumerate(order, 1):
            k_removed = len(order) - rank + 1
            rows.append({"rank": rank, "layer": self.layer_names[layer], "inclusion": float(mean[layer]),
                         "hdi_3%": float(hdi[layer, 0]), "hdi_97%": float(hdi[layer, 1]),
                         "p_removed_if_k": float(removal[layer, k_removed]), "k": k_removed})
        return rows

    def save(self, path: str | Path) -> None:
        tensors = {f"draws.{k}": v for k, v in self.draws.items()}
        tensors |= {f"sizes.{k}": v for k, v in self.sizes.items()}
        save_tensors(path, tensors, {"kinds": list(self.kinds), "layer_names": self.layer_names})

    @classmethod
    def load(cls, path: str | Path) -> "GatePosterior":
        tensors, meta = load_tensors(path)
        try:
            draws = {k.removeprefix("draws."): v for k, v in tensors.items() if k.startswith("draws.")}
            sizes = {k.removeprefix("sizes."): v for k, v in tensors.items() if k.startswith("sizes.")}
            posterior = cls(tuple(meta["kinds"]), list(meta["layer_names"]), draws, sizes)
            for kind in posterior.kinds:
                if draws[f"{kind}_logit"].shape[-1] != len(posterior.layer_names):
                    raise ValueError("draws do not match the layer names")
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path} is not a bayesprune posterior ({err})") from err
        return posterior

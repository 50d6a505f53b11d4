"""The cost-conditioned guide: a variational posterior over ``θ``, and through it over the gates at every cost.

``q(θ) = Π_sites Normal(loc, scale)`` (log-normal for the positive scales), one
vectorised site per parameter kind, and ``q(z | θ, λ) = p(z | θ, λ)``: the gates at a
cost are drawn from the cost-conditioned inclusion probabilities of
:mod:`bayesprune.core.inclusion` evaluated at a draw of ``θ``. Every inclusion
probability at every cost therefore has a posterior distribution, read off by
drawing ``θ``. With the cost held fixed it is the guide of a fixed-cost fit.

Its parameters are local to the module (Pyro's ``module_local_params``), never in
Pyro's global parameter store: two guides never share tensors by name, and the guide
is an ordinary ``nn.Module`` for optimisers, checkpoints and data-parallel wrappers.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam

from .model import ShrinkagePrior, Site


def _local_params():
    return pyro.settings.context(module_local_params=True)


class CostConditionedGuide(PyroModule):
    """Mean-field normal ``q(θ)`` over the sites of a :class:`~bayesprune.core.model.ShrinkagePrior`."""

    def __init__(self, prior: ShrinkagePrior, init_scale: float = 0.01):
        with _local_params():
            super().__init__()
            self.sites = prior.sites()
            for site in self.sites:
                start = site.start.log() if site.positive else site.start
                setattr(self, f"{site.name}_loc", PyroParam(start.float().clone()))
                setattr(self, f"{site.name}_scale", PyroParam(torch.full(site.shape, init_scale, device=start.device),
                                                              constraint=dist.constraints.positive))

    def set_sites(self, locs: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> None:
        """Put every site at the given normal (unconstrained space), e.g. one chain of a saved posterior."""
        with _local_params():
            for site in self.sites:
                setattr(self, f"{site.name}_loc", PyroParam(locs[site.name].float().clone()))
                setattr(self, f"{site.name}_scale", PyroParam(scales[site.name].float().clone(),
                                                              constraint=dist.constraints.positive))

    def loc_and_scale(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """The site's normal in unconstrained space (the log for positive sites)."""
        with _local_params():
            return getattr(self, f"{site.name}_loc"), getattr(self, f"{site.name}_scale")

    def __call__(self, *args, **kwargs):
        with _local_params():
            return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        theta = {}
        for site in self.sites:
            loc, scale = self.loc_and_scale(site)
            base = dist.LogNormal(loc, scale) if site.positive else dist.Normal(loc, scale)
            theta[site.name] = pyro.sample(site.name, base.to_event(len(site.shape)) if site.shape else base)
        return theta

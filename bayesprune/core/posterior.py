"""The fitted posterior: inclusion probabilities at any cost, with intervals; sizes, rankings, plans, InferenceData.

The guide is mean-field normal over ``θ`` (:mod:`bayesprune.core.guide`), so the posterior
is stored exactly as one ``Normal(loc, scale)`` per site in unconstrained space and per
*chain* (a fit of several chains runs the guide from several seeds), with the units'
importance and sizes. Draws of ``θ`` are generated from it on demand with a fixed
seed, so every summary of a saved posterior is repeatable, and every read-out is a
function of the cost: one fit answers for every size.

Intervals, HDIs and removal probabilities read the draws of every chain pooled; the
point read-outs that make a plan (``point=True``) read the median of one chain,
``chain``: the one the fit selected (:func:`bayesprune.core.fit.fit`), whose network the
extracted model is. :meth:`GatePosterior.convergence` gives R-hat and ESS across chains.

Two different uncertainties are reported and kept apart:

* ``{kind}_inclusion`` is the probability ``ρ_u(λ)`` that a unit's gate is on at cost
  ``λ``; its posterior mean is the *posterior inclusion probability*.
* the spread of ``ρ_u(λ)`` over draws of ``θ`` (its credible interval) is the
  uncertainty *about* that probability.

A target size is met in two steps, both at the posterior median of ``θ``: solve for
the cost whose expected kept size is the target (a fixed-cost fit keeps its cost),
then rank the units by their inclusion probability *at that cost* and keep the most
probable until the target is filled exactly
(:func:`bayesprune.core.selection.choose_by_probability`); the amplitudes at that cost are
folded into the kept weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import inclusion
from .config import PriorConfig
from .kinds import KINDS, layer_kinds, width_kinds
from .io import FileFormat, load_tensors, save_tensors
from .model import ShrinkagePrior
from .plan import ExtractionPlan
from .schema import Integer, Number
from .selection import choose_by_probability
from .sizes import UnitSizes
from .targets import ModelTotals, Target, TargetError

POSTERIOR_FORMAT = FileFormat("bayesprune-posterior", "a bayesprune posterior",
                              legacy=("bayesprune cost-conditioned posterior",),
                              schema={"kinds": [str], "layer_names": [str], "units": {str: Integer(1)},
                                      "prior": dict, "fixed_cost": (Number(0), None), "num_draws": Integer(1),
                                      "seed": Integer(0), "chain?": Integer(0)})
_MAX_POSITION = 1 - 1e-6  # t = λ / (1 + λ) of the largest cost the solver tries (λ ≈ 10⁶)


def seed_interval(draws: np.ndarray, level: float = 0.9,
                  bounds: tuple[float, float] = (-np.inf, np.inf)) -> tuple[np.ndarray, np.ndarray]:
    """Where a fit from another seed would put a draw, from ``(chain, draw, …)`` draws of two chains or more: the
    chains' mean ± t(K − 1) · sqrt((1 + 1/K) · between-chain variance + within-chain variance), the Student-t
    prediction interval of a new chain (K chains), cut to the ``bounds`` the quantity lives in. With two chains
    t(1) is 6.3 at 90 %: the interval is wide, as two draws of a seed's answer warrant; three or four narrow it.

    Mean-field chains are each far narrower than the spread between them, so pooling their draws covers
    another seed's answer only where it lands near one of them; this interval widens by what the chains show.
    """
    from scipy.stats import t as student

    chains = draws.shape[0]
    if chains < 2:
        raise ValueError("an interval for another seed needs two chains or more")
    means = draws.mean(1)
    spread = (1 + 1 / chains) * means.var(0, ddof=1) + draws.var(1, ddof=1).mean(0)
    half = student.ppf((1 + level) / 2, chains - 1) * np.sqrt(spread)
    return np.maximum(means.mean(0) - half, bounds[0]), np.minimum(means.mean(0) + half, bounds[1])


def cost_grid(count: int = 25, largest: float = 20.0) -> list[float]:
    """Costs evenly spaced on the curves' axis ``λ / (1 + λ)`` from 0 to ``largest``."""
    top = largest / (1 + largest)
    return [t / (1 - t) for t in (top * i / (count - 1) for i in range(count))]


@dataclass
class GatePosterior:
    """Mean-field posterior of the inclusion parameters, with the units' names, importance and sizes.

    ``locs`` and ``scales`` hold ``(chain, *site shape)`` per site; ``chain`` is the one point read-outs use.
    """

    prior: PriorConfig
    kinds: tuple[str, ...]
    layer_names: list[str]
    units: dict[str, int]
    importance: dict[str, torch.Tensor]
    sizes: UnitSizes
    locs: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]
    fixed_cost: float | None = None
    num_draws: int = 100
    seed: int = 0
    chain: int = 0
    _theta: dict[str, torch.Tensor] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_guide(cls, guide, model, fixed_cost: float | None = None, num_draws: int = 100,
                   seed: int = 0) -> "GatePosterior":
        """Read the loc and scale of every site of a :class:`~bayesprune.core.guide.CostConditionedGuide`."""
        return cls.from_guides([guide], model, fixed_cost, num_draws, seed)

    @classmethod
    def from_guides(cls, guides: list, model, fixed_cost: float | None = None, num_draws: int = 100,
                    seed: int = 0, chain: int = 0) -> "GatePosterior":
        """One chain per guide (fitted from seeds ``seed``, ``seed + 1``, …); point read-outs use ``chain``."""
        locs, scales = {}, {}
        for site in guides[0].sites:
            pairs = [guide.loc_and_scale(site) for guide in guides]
            locs[site.name] = torch.stack([loc.detach().cpu() for loc, _ in pairs])
            scales[site.name] = torch.stack([scale.detach().cpu() for _, scale in pairs])
        gated = model.gated
        return cls(model.prior.config, tuple(gated.kinds), list(gated.layer_names), dict(gated.values.units),
                   {k: v.detach().float().cpu().clone() for k, v in model.importance.items()}, model.sizes.to("cpu"),
                   locs, scales, fixed_cost, num_draws, seed, chain)

    @property
    def num_chains(self) -> int:
        return next(iter(self.locs.values())).shape[0]

    def pooled(self, others: list["GatePosterior"], chain: int = 0) -> "GatePosterior":
        """This posterior's chains followed by those of ``others`` (fits of the same gates, prior and model),
        as one posterior of several chains whose point read-outs use ``chain``."""
        for other in others:
            if (other.kinds, other.layer_names, other.units, other.prior) != \
                    (self.kinds, self.layer_names, self.units, self.prior):
                raise ValueError("only posteriors of the same gates, layers and prior can be pooled")
        every = [self, *others]
        return GatePosterior(self.prior, self.kinds, self.layer_names, self.units, self.importance, self.sizes,
                             {k: torch.cat([p.locs[k] for p in every]) for k in self.locs},
                             {k: torch.cat([p.scales[k] for p in every]) for k in self.scales},
                             self.fixed_cost, self.num_draws, self.seed, chain)

    # -- draws -----------------------------------------------------------------------------------------

    @property
    def sites(self):
        return ShrinkagePrior(self.prior, self.kinds, len(self.layer_names), self.units).sites()

    def theta(self) -> inclusion.Theta:
        """``(draw, ...)`` samples of every site, the same ones every time: ``num_draws`` of each chain in turn
        (chain ``c`` draws what a one-chain posterior of seed ``seed + c`` draws)."""
        if not self._theta:
            for index, site in enumerate(self.sites):
                draws = []
                for chain in range(self.num_chains):
                    generator = torch.Generator().manual_seed((self.seed + chain) * 1_000_003 + index)
                    loc, scale = self.locs[site.name][chain], self.scales[site.name][chain]
                    draws.append(loc + scale * torch.randn((self.num_draws,) + loc.shape, generator=generator))
                value = torch.cat(draws)
                self._theta[site.name] = value.exp() if site.positive else value
        return self._theta

    def median(self) -> inclusion.Theta:
        """The posterior median of every site in the point chain, with a leading draw dimension of 1."""
        return {site.name: (self.locs[site.name][self.chain].exp() if site.positive
                            else self.locs[site.name][self.chain])[None] for site in self.sites}

    def _cost(self, cost: float | None) -> float:
        if cost is None:
            if self.fixed_cost is None:
                raise ValueError("this posterior answers for every cost: say which one (cost=…)")
            return self.fixed_cost
        inclusion.cost_position(cost)  # refuses negative and non-finite costs
        return float(cost)

    @torch.no_grad()
    def inclusion(self, cost: float | None = None, point: bool = False) -> dict[str, torch.Tensor]:
        """``ρ(λ)`` per draw of ``θ``: ``(draw, layer)`` or ``(draw, layer, unit)`` per kind
        (``point``: at the posterior median of ``θ``, one draw)."""
        theta = self.median() if point else self.theta()
        return inclusion.probabilities(theta, self.importance, self._cost(cost), self.prior)

    def inclusion_mean(self, cost: float | None = None, point: bool = False) -> dict[str, torch.Tensor]:
        """Posterior inclusion probability of every unit at ``cost`` (``point``: at the median of ``θ``)."""
        return {k: v.double().mean(0) for k, v in self.inclusion(cost, point).items()}

    @torch.no_grad()
    def amplitudes(self, cost: float | None = None, point: bool = False) -> dict[str, torch.Tensor]:
        """Output amplitude of every unit at ``cost``: the posterior mean, or at the median of ``θ``."""
        values = inclusion.amplitudes(self.median() if point else self.theta(), self.importance, self._cost(cost))
        return {k: v.mean(0) for k, v in values.items()}

    @torch.no_grad()
    def thresholds(self, kind: str, cost: float | None = None) -> torch.Tensor:
        """Each layer's threshold for ``kind`` per draw, ``(draw, layer)``."""
        return inclusion.thresholds(self.theta(), kind, self._cost(cost), self.prior)

    # -- sizes -----------------------------------------------------------------------------------------

    def expected_fraction(self, cost: float | None = None, measure: UnitSizes | None = None,
                          point: bool = False) -> float:
        """Posterior expected fraction of decoder parameters (or of ``measure``) kept by hard gates at ``cost``
        (``point``: given the median of ``θ``)."""
        return float((measure or self.sizes).kept_fraction(self.inclusion(cost, point)).mean())

    def fraction_draws(self, cost: float | None = None, seed: int = 0) -> torch.Tensor:
        """Kept fractions of hard gate draws, one per draw of ``θ``: both uncertainties at once."""
        generator = torch.Generator().manual_seed(seed)
        gates = {k: torch.bernoulli(v.double(), generator=generator) for k, v in self.inclusion(cost).items()}
        return self.sizes.kept_fraction(gates)

    def expected_blocks(self, cost: float | None = None, point: bool = False) -> float:
        """Posterior expected number of blocks that contribute at ``cost``."""
        return float(self.block_keep_probability(cost, point).sum(-1).mean())

    def size_curve(self, costs, totals: ModelTotals) -> list[dict]:
        """Per cost: expected kept fraction, its spread over draws, parameters and MB (10⁶ bytes)."""
        decoder = self.sizes.decoder_parameters
        rows = []
        for cost in costs:
            draws = self.fraction_draws(float(cost))
            mean = self.expected_fraction(float(cost))
            parameters = mean * decoder + totals.outside_parameters
            rows.append({"cost": float(cost), "fraction": mean, "fraction_sd": float(draws.std()),
                         "fraction_5%": float(draws.quantile(0.05)), "fraction_95%": float(draws.quantile(0.95)),
                         "parameters": parameters, "megabytes": parameters * totals.bytes_per_parameter / 1e6})
        return rows

    def solve(self, target: Target | str | float, totals: ModelTotals | None, tolerance: float = 1e-4) -> float:
        """The cost whose expected kept size at the posterior median of ``θ`` equals ``target`` (bisection over
        ``λ / (1 + λ)``); ``totals`` may be ``None`` for a number of blocks."""
        target = target if isinstance(target, Target) else Target.parse(target)
        if totals is None and target.kind != "layers":
            raise ValueError(f"solving for {target} needs the model's totals (ModelTotals.of(model))")
        if target.kind == "layers":
            if not layer_kinds(self.kinds):
                raise TargetError(f"a block count needs block, attn or mlp gates; this run gates {list(self.kinds)}")
            wanted = target.value

            def size(cost):
                return self.expected_blocks(cost, point=True)
        else:
            measure = self.sizes.flops() if target.kind == "flops" else self.sizes
            wanted = totals.decoder_fraction(target, self.sizes.decoder_parameters)

            def size(cost):
                return self.expected_fraction(cost, measure, point=True)
        low, high = 0.0, _MAX_POSITION
        if size(high / (1 - high)) > wanted:
            return high / (1 - high)  # the largest cost still keeps more: the chooser fills to the target
        while high - low > tolerance:
            middle = (low + high) / 2
            if size(middle / (1 - middle)) > wanted:
                low = middle
            else:
                high = middle
        return high / (1 - high)

    def plan(self, target: Target | str | float, totals: ModelTotals, form: str = "per-layer",
             multiple: int = 1) -> ExtractionPlan:
        """The sub-network for ``target``: units ranked by inclusion at the solved (or fixed) cost.

        Solving, ranking and the amplitudes folded into the kept weights all read the
        posterior median of ``θ`` (measured: better sub-networks than ranking by the
        posterior mean inclusion, which units with wide posteriors blur at small sizes),
        so the extracted model is the hard-gated network at that point and cost.
        """
        target = target if isinstance(target, Target) else Target.parse(target)
        cost = self.fixed_cost if self.fixed_cost is not None else self.solve(target, totals)
        p = self.inclusion_mean(cost, point=True)
        layer = {k: v for k, v in p.items() if k in layer_kinds()}
        units = {k: v for k, v in p.items() if k in width_kinds()}
        keep = self.block_keep_probability(cost, point=True).double().mean(0)
        plan = choose_by_probability(self.sizes, totals, layer, units, keep, target, form, multiple)
        plan.cost = cost
        return plan.fold(self.amplitudes(cost, point=True))

    # -- blocks ----------------------------------------------------------------------------------------

    def block_keep_probability(self, cost: float | None = None, point: bool = False) -> torch.Tensor:
        """Per draw, the probability that a block contributes at all, ``(draw, layer)``.

        A block is gone when its block gate is off, or when every branch gated inside
        it is off; kinds without gates count as on (width gates are not counted: a
        block keeps its most likely head and neuron).
        """
        on = {k: v for k, v in self.inclusion(cost, point).items() if k in layer_kinds()}
        draws = 1 if point else self.num_chains * self.num_draws
        return inclusion.block_on_probability(on, torch.ones(draws, len(self.layer_names)))

    def removal_probability(self, cost: float | None = None) -> torch.Tensor:
        """``P[l, k]``: posterior probability that block ``l`` is among the ``k`` removed first at ``cost``.

        Over draws of ``θ``, blocks are ordered by their keep probability in that
        draw; ``k`` runs from 0 to the number of layers.
        """
        keep = self.block_keep_probability(cost)                              # (draw, layer)
        ranks = torch.argsort(torch.argsort(keep, dim=1, stable=True), dim=1)  # 0 = removed first
        k = torch.arange(keep.shape[1] + 1)
        return (ranks[:, :, None] < k).float().mean(0)                        # (layer, k)

    def summary(self, cost: float | None = None) -> list[dict]:
        """Per block at ``cost``: inclusion mean, 94 % HDI, rank and probability of removal at its rank."""
        import arviz as az

        keep = self.block_keep_probability(cost).numpy()
        mean = keep.mean(0)
        hdi = az.hdi(keep[None], hdi_prob=0.94)  # (layer, 2)
        removal = self.removal_probability(cost)
        order = np.argsort(-mean, kind="stable")
        rows = []
        for rank, layer in enumerate(order, 1):
            k_removed = len(order) - rank + 1
            rows.append({"rank": rank, "layer": self.layer_names[layer], "inclusion": float(mean[layer]),
                         "hdi_3%": float(hdi[layer, 0]), "hdi_97%": float(hdi[layer, 1]),
                         "p_removed_if_k": float(removal[layer, k_removed]), "k": k_removed})
        return rows

    def width_summary(self, cost: float | None = None) -> list[dict]:
        """Per layer and width kind at ``cost``: expected fraction of units kept, 94 % HDI (over every chain's
        draws), units above 1/2; with two chains or more, also the 90 % interval for a fit from another seed
        (:func:`seed_interval`)."""
        import arviz as az

        rows = []
        p = self.inclusion(cost)
        for kind in width_kinds(self.kinds):
            fraction = p[kind].mean(-1).numpy()
            hdi = az.hdi(fraction[None], hdi_prob=0.94)
            likely = (p[kind].double().mean(0) > 0.5).sum(-1)
            seeds = seed_interval(fraction.reshape(self.num_chains, self.num_draws, -1), bounds=(0.0, 1.0)) \
                if self.num_chains > 1 else None
            for layer, name in enumerate(self.layer_names):
                rows.append({"kind": kind, "layer": name, "kept_fraction": float(fraction[:, layer].mean()),
                             "hdi_3%": float(hdi[layer, 0]), "hdi_97%": float(hdi[layer, 1]),
                             "units_above_half": int(likely[layer]), "units": self.units[kind]})
                if seeds is not None:
                    rows[-1] |= {"seed_5%": float(seeds[0][layer]), "seed_95%": float(seeds[1][layer])}
        return rows

    # -- ArviZ -----------------------------------------------------------------------------------------

    def default_costs(self) -> list[float]:
        return [self.fixed_cost] if self.fixed_cost is not None else cost_grid(9, 5.0)

    def to_inference_data(self, costs=None, num_draws: int | None = None):
        """ArviZ ``InferenceData`` over a cost grid: the fit's chains on ``chain``, dims named after structure,
        real module names.

        ``{kind}_inclusion`` has dims ``(cost, layer)`` or ``(cost, layer, head|neuron)``;
        ``{kind}_kept_fraction`` (width kinds) and ``{kind}_threshold`` ``(cost, layer)``;
        ``kept_fraction`` ``(cost,)`` is the expected fraction of decoder parameters
        kept; the prior's scales are there too. ``num_draws`` keeps only the first draws of each chain.
        """
        import arviz as az

        costs = [float(c) for c in (costs if costs is not None else self.default_costs())]
        n, chains = min(num_draws or self.num_draws, self.num_draws), self.num_chains
        theta = {name: value.reshape(chains, self.num_draws, *value.shape[1:])[:, :n].flatten(0, 1)
                 for name, value in self.theta().items()}

        def by_chain(value: torch.Tensor):
            return value.float().reshape(chains, n, *value.shape[1:]).numpy()
        posterior, dims = {}, {}
        coords = {"cost": costs, "layer": self.layer_names, **{k: np.arange(u) for k, u in self.units.items()}}
        per_cost: dict[str, list] = {}
        with torch.no_grad():
            for cost in costs:
                p = inclusion.probabilities(theta, self.importance, cost, self.prior)
                for kind, value in p.items():
                    per_cost.setdefault(f"{kind}_inclusion", []).append(value)
                    if kind in width_kinds():
                        per_cost.setdefault(f"{kind}_kept_fraction", []).append(value.mean(-1))
                    per_cost.setdefault(f"{kind}_threshold", []).append(
                        inclusion.thresholds(theta, kind, cost, self.prior))
                per_cost.setdefault("kept_fraction", []).append(self.sizes.kept_fraction(p))
        for name, values in per_cost.items():
            posterior[name] = by_chain(torch.stack(values, 1))                       # (chain, draw, cost, …)
            kind = name.split("_", 1)[0]
            dims[name] = (["cost"] if name == "kept_fraction" else
                          ["cost", "layer", kind] if name == f"{kind}_inclusion" and kind in width_kinds() else
                          ["cost", "layer"])
        for kind in self.kinds:
            posterior[f"{kind}_global_scale"] = by_chain(theta[f"{kind}_global_scale"])
            posterior[f"{kind}_local_scale"] = by_chain(theta[f"{kind}_local_scale"])
            dims[f"{kind}_local_scale"] = ["layer"]
        return az.from_dict(posterior=posterior, dims=dims, coords=coords,
                            attrs={"inference_library": "pyro", "method": "SVI, cost-conditioned guide (bayesprune)",
                                   "fixed_cost": "none" if self.fixed_cost is None else self.fixed_cost,
                                   "point_chain": self.chain})

    def convergence(self, cost: float | None = None, idata=None) -> list[dict]:
        """Per kind and layer at ``cost``: R-hat and bulk ESS across chains of the block or branch inclusion
        (layer kinds) and of the kept share of heads or neurons (width kinds); needs two chains or more.
        R-hat is NaN where every draw of every chain is the same (nothing varies, nothing disagrees).

        ``idata`` (from :meth:`to_inference_data`, holding ``cost``) saves building it again.
        """
        import arviz as az

        if self.num_chains < 2:
            raise ValueError("R-hat compares chains: fit with chains >= 2 (FitConfig.chains, --chains)")
        cost = self._cost(cost)
        idata = idata if idata is not None else self.to_inference_data([cost])
        names = {kind: f"{kind}_inclusion" if kind in layer_kinds() else f"{kind}_kept_fraction"
                 for kind in self.kinds}
        at = idata.posterior[list(names.values())].sel(cost=cost, method="nearest")
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN: every draw of every chain the same
            rhat, ess = az.rhat(at), az.ess(at, method="bulk")
        return [{"kind": kind, "layer": layer, "variable": name, "r_hat": float(rhat[name].sel(layer=layer)),
                 "ess_bulk": float(ess[name].sel(layer=layer))}
                for kind, name in names.items() for layer in self.layer_names]

    # -- files -----------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        tensors = {f"loc.{k}": v for k, v in self.locs.items()}
        tensors |= {f"scale.{k}": v for k, v in self.scales.items()}
        tensors |= {f"importance.{k}": v for k, v in self.importance.items()}
        tensors |= self.sizes.to_tensors()
        save_tensors(path, tensors, POSTERIOR_FORMAT, {"kinds": list(self.kinds),
                                     "layer_names": self.layer_names, "units": self.units,
                                     "prior": self.prior.to_dict(), "fixed_cost": self.fixed_cost,
                                     "num_draws": self.num_draws, "seed": self.seed, "chain": self.chain})

    @classmethod
    def load(cls, path: str | Path) -> "GatePosterior":
        tensors, meta = load_tensors(path, POSTERIOR_FORMAT)

        def part(prefix):
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            unknown = [kind for kind in meta["kinds"] if kind not in KINDS]
            if unknown:
                raise ValueError(f"it gates unit kinds {unknown} this bayesprune does not know")
            fixed = meta["fixed_cost"]
            posterior = cls(PriorConfig.from_dict(meta["prior"]), tuple(meta["kinds"]), list(meta["layer_names"]),
                            {k: int(v) for k, v in meta["units"].items()}, part("importance."),
                            UnitSizes.from_tensors(tensors), part("loc."), part("scale."),
                            None if fixed is None else float(fixed), int(meta["num_draws"]), int(meta["seed"]),
                            int(meta.get("chain", 0)))
            chains = set()
            for site in posterior.sites:
                for stored in (posterior.locs, posterior.scales):
                    if tuple(stored[site.name].shape) == site.shape:  # written before chains: one chain
                        stored[site.name] = stored[site.name][None]
                    if tuple(stored[site.name].shape[1:]) != site.shape:
                        raise ValueError(f"site {site.name} has shape {tuple(stored[site.name].shape)}, the prior "
                                         f"expects (chain, *{site.shape})")
                    chains.add(stored[site.name].shape[0])
                loc, scale = posterior.locs[site.name], posterior.scales[site.name]
                if not (torch.isfinite(loc).all() and torch.isfinite(scale).all() and (scale > 0).all()):
                    raise ValueError(f"site {site.name} holds non-finite values or non-positive scales")
            for name, tensor in tensors.items():
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(f"{name} holds non-finite values")
            if len(chains) != 1 or not 0 <= posterior.chain < chains.pop():
                raise ValueError("its sites hold different numbers of chains, or its point chain is not one of them")
            if posterior.sizes.num_layers != len(posterior.layer_names):
                raise ValueError("the unit sizes do not match the layer names")
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise POSTERIOR_FORMAT.damaged(path, err) from err
        return posterior

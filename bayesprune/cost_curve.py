"""Any size from one amortised fit: kept size as a function of the cost, and the cost for a target.

Everything here reads the fitted guide only — no forward pass — so resizing to a
new target takes milliseconds. The kept fraction at a cost has a mean (exact,
from the nested inclusion probabilities) and a spread over hard gate draws. A
target is met in two steps: solve for the cost whose expected kept size is the
target, then rank the units by their inclusion probability *at that cost* and keep
the most probable ones until the target is filled exactly (the same chooser as a
fixed-cost posterior, :func:`bayesprune.selection.choose`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .amortised import CostConditionedGates
from .config import WIDTH_KINDS, AmortisedConfig
from .io import load_tensors, save_tensors
from .model import block_on_probability, kept_fraction
from .selection import ExtractionPlan, ModelTotals, Target, TargetError, choose_by_probability

CURVE_FILE = "cost_curve.safetensors"
_MAX_POSITION = 1 - 1e-6  # t = λ / (1 + λ) of the largest cost the solver tries (λ ≈ 10⁶)


@dataclass
class CostCurve:
    """A fitted cost-conditioned guide with the unit sizes of the network it gates."""

    gates: CostConditionedGates
    sizes: dict[str, torch.Tensor]
    layer_names: list[str]

    @torch.no_grad()
    def probabilities(self, cost: float) -> dict[str, torch.Tensor]:
        return {k: p.double() for k, p in self.gates.probabilities(cost).items()}

    @torch.no_grad()
    def amplitudes(self, cost: float) -> dict[str, torch.Tensor]:
        """What each kept unit's output is scaled by at ``cost`` (folded into the weights on extraction)."""
        return {k: self.gates.amplitude(k, cost) for k in self.gates.kinds if k in self.gates.log_amplitudes}

    def expected_fraction(self, cost: float) -> float:
        """Expected fraction of decoder parameters kept by hard gates at ``cost``."""
        return float(kept_fraction(self.probabilities(cost), self.sizes))

    def fraction_draws(self, cost: float, num_draws: int = 200, seed: int = 0) -> torch.Tensor:
        """Kept fractions of ``num_draws`` hard gate draws at ``cost``."""
        generator = torch.Generator().manual_seed(seed)
        p = self.probabilities(cost)
        gates = {k: torch.bernoulli(v.expand(num_draws, *v.shape), generator=generator) for k, v in p.items()}
        return kept_fraction(gates, self.sizes)

    def size_curve(self, costs, totals: ModelTotals, num_draws: int = 200) -> list[dict]:
        """Per cost: expected kept fraction, its spread over gate draws, parameters and MB (10⁶ bytes)."""
        decoder = float(kept_fraction({}, self.sizes))
        rows = []
        for cost in costs:
            draws = self.fraction_draws(float(cost), num_draws)
            mean = self.expected_fraction(float(cost))
            parameters = mean * decoder + totals.outside_parameters
            rows.append({"cost": float(cost), "fraction": mean, "fraction_sd": float(draws.std()),
                         "fraction_5%": float(draws.quantile(0.05)), "fraction_95%": float(draws.quantile(0.95)),
                         "parameters": parameters, "megabytes": parameters * totals.bytes_per_parameter / 1e6})
        return rows

    def solve(self, target: Target | str | float, totals: ModelTotals, tolerance: float = 1e-4) -> float:
        """The cost whose expected kept size equals ``target`` (bisection over ``λ / (1 + λ)``)."""
        target = target if isinstance(target, Target) else Target.parse(target)
        if target.kind == "layers":
            raise TargetError("a cost curve is solved for a size (fraction, parameters or MB), not a block count")
        decoder = float(kept_fraction({}, self.sizes))
        wanted = {"fraction": target.value, "parameters": (target.value - totals.outside_parameters) / decoder,
                  "bytes": (target.value / totals.bytes_per_parameter - totals.outside_parameters) / decoder
                  }[target.kind]
        if wanted <= 0:
            raise TargetError(f"target {target} leaves nothing for the decoder blocks")
        low, high = 0.0, _MAX_POSITION
        if self.expected_fraction(high / (1 - high)) > wanted:
            return high / (1 - high)  # the largest cost still keeps more: the chooser fills to the target
        while high - low > tolerance:
            middle = (low + high) / 2
            if self.expected_fraction(middle / (1 - middle)) > wanted:
                low = middle
            else:
                high = middle
        return high / (1 - high)

    def plan(self, target: Target | str | float, totals: ModelTotals, form: str = "per-layer",
             multiple: int = 1) -> ExtractionPlan:
        """The sub-network for ``target``: units ranked by inclusion probability at the solved cost.

        The plan carries the amplitudes at that cost, so the extracted model is the
        hard-gated network the guide trained at that cost.
        """
        target = target if isinstance(target, Target) else Target.parse(target)
        cost = self.solve(target, totals)
        p = self.probabilities(cost)
        layer = {k: v for k, v in p.items() if k not in WIDTH_KINDS}
        units = {k: v for k, v in p.items() if k in WIDTH_KINDS}
        keep = block_on_probability(layer, torch.ones(len(self.layer_names), dtype=torch.float64))
        plan = choose_by_probability(self.sizes, totals, layer, units, keep, target, form, multiple)
        plan.cost = cost
        return plan.fold(self.amplitudes(cost))

    def save(self, path: str | Path) -> None:
        tensors = {f"gates.{k}": v for k, v in self.gates.state_dict().items()}
        tensors |= {f"sizes.{k}": v for k, v in self.sizes.items()}
        save_tensors(path, tensors, {"kinds": list(self.gates.kinds), "layer_names": self.layer_names,
                                     "config": self.gates.config.to_dict()})

    @classmethod
    def load(cls, path: str | Path) -> "CostCurve":
        tensors, meta = load_tensors(path)
        try:
            importance = {k: tensors[f"gates.importance_{k}"] for k in meta["kinds"]}
            gates = CostConditionedGates(importance, AmortisedConfig.from_dict(meta["config"]))
            gates.load_state_dict({k.removeprefix("gates."): v for k, v in tensors.items() if k.startswith("gates.")})
            sizes = {k.removeprefix("sizes."): v for k, v in tensors.items() if k.startswith("sizes.")}
            curve = cls(gates, sizes, list(meta["layer_names"]))
            if any(v.shape[0] != len(curve.layer_names) for v in importance.values()):
                raise ValueError("the gates do not match the layer names")
        except (KeyError, ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"{path} is not a bayesprune cost curve ({err})") from err
        return curve

    @classmethod
    def from_fit(cls, fit) -> "CostCurve":
        """The curve of an :class:`~bayesprune.amortised_fit.AmortisedFit`."""
        return cls(fit.gates, fit.sizes, list(fit.gated.layer_names))


def cost_grid(count: int = 25, largest: float = 20.0) -> list[float]:
    """Costs evenly spaced on the curves' axis ``λ / (1 + λ)`` from 0 to ``largest``."""
    top = largest / (1 + largest)
    return [t / (1 - t) for t in (top * i / (count - 1) for i in range(count))]


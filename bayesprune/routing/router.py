"""A router's predictive model: a conjugate Bayesian regression of every candidate's loss on prompt features.

For one prompt with standardised features ``z`` (``d`` numbers) and the losses ``y`` of
the ``C`` candidate sets (nats per token)::

    y = ȳ + Bᵀz + ε,                      ε ~ N(0, Σ)                 # (C,)
    B | Σ ~ MatrixNormal(0, I_d / α, Σ),   Σ ~ InverseWishart(ν₀, Ψ₀)  # B: (d, C)

The posterior is in closed form, and so is the predictive for a new prompt: a
multivariate Student-t. Its correlations matter for routing: a prompt that is hard
for one candidate is hard for all, and that shared error cancels when candidates are
compared. ``α`` maximises the closed-form evidence over a grid (empirical Bayes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy import stats


@dataclass
class Prediction:
    """Per prompt and candidate: the predictive mean, the central ``level`` interval, the probability
    that the candidate has the lowest loss, and its expected regret ``E[y_c − min y]`` (nats per token);
    each of shape ``(prompts, candidates)``."""

    mean: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    best: torch.Tensor
    regret: torch.Tensor
    level: float


_FITTED = ("feature_mean", "feature_scale", "loss_mean", "precision_inverse", "coefficients", "scale",
           "_standard_draws")


class BayesianRouter:
    """Predicts each candidate's loss from prompt features, with intervals and the probability of being best."""

    def __init__(self, names: list[str], level: float = 0.9, draws: int = 4000, seed: int = 0):
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"the router needs distinct candidate names, got {names}")
        if not 0 < level < 1:
            raise ValueError(f"the interval level must be in (0, 1), not {level}")
        self.names, self.level, self.draws, self.seed = list(names), level, draws, seed

    def fit(self, features: torch.Tensor, losses: torch.Tensor) -> "BayesianRouter":
        """Condition on ``features`` ``(n, d)`` and ``losses`` ``(n, C)`` of the training prompts."""
        x, y = features.double(), losses.double()
        n, c = y.shape
        if x.shape[0] != n or c != len(self.names) or n < 2:
            raise ValueError(f"need (n, d) features and (n, {len(self.names)}) losses for n >= 2 prompts, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        self.feature_mean, self.feature_scale = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - self.feature_mean) / self.feature_scale
        self.loss_mean = y.mean(0)
        y = y - self.loss_mean
        eigenvalues, vectors = torch.linalg.eigh(z.T @ z)
        eigenvalues = eigenvalues.clamp_min(0)
        rotated = vectors.T @ (z.T @ y)                                        # (d, C)
        self.prior_dof = c + 2.0                                               # prior mean of Σ is Ψ₀
        prior_scale = torch.diag(0.1 * y.var(0).clamp_min(1e-12))
        self.evidence = {}
        for alpha in torch.logspace(-2, 5, 36, dtype=torch.float64).tolist():
            scatter = prior_scale + y.T @ y - rotated.T @ (rotated / (eigenvalues + alpha)[:, None])
            self.evidence[alpha] = (0.5 * c * (z.shape[1] * math.log(alpha) - torch.log(eigenvalues + alpha).sum())
                                    + 0.5 * self.prior_dof * torch.logdet(prior_scale)
                                    - 0.5 * (self.prior_dof + n) * torch.logdet(scatter)
                                    + torch.mvlgamma(torch.tensor((self.prior_dof + n) / 2, dtype=torch.float64), c)
                                    - torch.mvlgamma(torch.tensor(self.prior_dof / 2, dtype=torch.float64), c)
                                    - 0.5 * n * c * math.log(math.pi)).item()
        self.alpha = max(self.evidence, key=self.evidence.get)
        inverse = vectors / (eigenvalues + self.alpha)                         # Λₙ⁻¹ = inverse @ vectorsᵀ
        self.precision_inverse = inverse @ vectors.T                           # (d, d)
        self.coefficients = inverse @ rotated                                  # Bₙ: (d, C)
        scatter = prior_scale + y.T @ y - rotated.T @ (rotated / (eigenvalues + self.alpha)[:, None])
        self.n = n
        self.dof = self.prior_dof + n - c + 1
        self.scale = scatter / self.dof                                        # predictive scale at h = 0
        generator = torch.Generator().manual_seed(self.seed)
        normal = torch.randn(self.draws, c, generator=generator, dtype=torch.float64)
        chi2 = torch.randn(self.draws, int(self.dof), generator=generator, dtype=torch.float64).square().sum(-1)
        mixing = (self.dof / chi2).sqrt()                                      # dof = n + 3 is a whole number
        self._standard_draws = (normal @ torch.linalg.cholesky(self.scale).T) * mixing[:, None]  # (draws, C)
        return self

    def predict(self, features: torch.Tensor) -> Prediction:
        """The predictive for prompts with ``features`` ``(m, d)``."""
        if not hasattr(self, "coefficients"):
            raise RuntimeError("fit the router before predicting")
        z = (features.double().reshape(-1, self.feature_mean.numel()) - self.feature_mean) / self.feature_scale
        mean = self.loss_mean + z @ self.coefficients                          # (m, C)
        spread = (1 + 1 / self.n + ((z @ self.precision_inverse) * z).sum(-1)).sqrt()   # (m,)
        half = stats.t.ppf(0.5 + self.level / 2, self.dof) * self.scale.diagonal().sqrt()
        draws = mean[:, None, :] + spread[:, None, None] * self._standard_draws        # (m, draws, C)
        best = torch.nn.functional.one_hot(draws.argmin(-1), mean.shape[1]).double().mean(1)
        regret = (draws - draws.min(-1, keepdim=True).values).mean(1)
        return Prediction(mean.float(), (mean - spread[:, None] * half).float(), (mean + spread[:, None] * half).float(),
                          best.float(), regret.float(), self.level)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The fitted router as tensors and JSON-able settings (for :meth:`from_state`)."""
        if not hasattr(self, "coefficients"):
            raise RuntimeError("fit the router before saving it")
        settings = {"names": self.names, "level": self.level, "draws": self.draws, "seed": self.seed,
                    "alpha": self.alpha, "n": self.n, "dof": self.dof, "prior_dof": self.prior_dof,
                    "evidence": {repr(a): e for a, e in self.evidence.items()}}
        return {name.lstrip("_"): getattr(self, name) for name in _FITTED}, settings

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], settings: dict) -> "BayesianRouter":
        router = cls(settings["names"], settings["level"], settings["draws"], settings["seed"])
        missing = [name for name in _FITTED if name.lstrip("_") not in tensors]
        if missing:
            raise ValueError(f"the router state lacks {missing}")
        d, c = tensors["feature_mean"].numel(), len(router.names)
        shapes = {"feature_mean": (d,), "feature_scale": (d,), "loss_mean": (c,), "precision_inverse": (d, d),
                  "coefficients": (d, c), "scale": (c, c), "_standard_draws": (router.draws, c)}
        for name, shape in shapes.items():
            tensor = tensors[name.lstrip("_")]
            if tuple(tensor.shape) != shape or not torch.isfinite(tensor).all():
                raise ValueError(f"the router's {name.lstrip('_')} should be finite of shape {shape}, "
                                 f"not {tuple(tensor.shape)}")
        for name in _FITTED:
            setattr(router, name, tensors[name.lstrip("_")].double())
        router.alpha, router.n, router.dof, router.prior_dof = (settings[k] for k in ("alpha", "n", "dof", "prior_dof"))
        router.evidence = {float(a): e for a, e in settings["evidence"].items()}
        return router

    def record(self) -> dict:
        """What the fit chose, for a results file."""
        return {"candidates": self.names, "alpha": self.alpha, "dof": self.dof, "prompts": self.n,
                "features": int(self.feature_mean.numel()), "level": self.level}

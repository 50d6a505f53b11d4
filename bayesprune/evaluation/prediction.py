"""Quality before extracting: held-out loss of sub-networks sampled at a cost, and their ensembles.

At a cost ``λ`` the posterior is a distribution over sub-networks. Drawing
``S`` of them (hard gates from the inclusion probabilities, amplitudes at ``λ``) and
scoring each on a small validation budget gives a predicted held-out loss with a
band: the spread over sub-networks, widened by the sampling error of the budget
(a bootstrap over validation windows). Averaging the *predictions* of the ``S``
sub-networks (the posterior-predictive mixture ``p(x) = mean_s p_s(x)``) is the
ensemble; :func:`ensemble_nll` scores it against its members.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..inputs.data import batches
from ..core.adapters import adapters_scaled
from ..core.gates import GatedModel
from ..core.likelihood import token_nll
from ..core.posterior import GatePosterior


def _token_log_probs(gated: GatedModel, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probability of every predicted token, ``(windows, seq_len − 1)``."""
    parts = []
    for batch in batches(windows, batch_size):
        batch = batch.to(next(gated.parameters()).device)
        parts.append(-token_nll(gated(input_ids=batch, use_cache=False).logits, batch).cpu())
    return torch.cat(parts)


def _draw(posterior: GatePosterior, cost: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Hard gates of one sub-network: a draw of ``θ``, then the gates given it."""
    p = posterior.inclusion(cost)
    index = int(torch.randint(next(iter(p.values())).shape[0], (), generator=generator))  # any chain's draw
    return {k: torch.bernoulli(v[index].double(), generator=generator).float() for k, v in p.items()}


@torch.no_grad()
def sampled_log_probs(gated: GatedModel, posterior: GatePosterior, windows: torch.Tensor, cost: float,
                      num_masks: int = 8, seed: int = 0, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Token log-probabilities under ``num_masks`` sub-networks drawn at ``cost``, ``(mask, window, token)``,
    and each sub-network's kept fraction of decoder parameters."""
    generator = torch.Generator().manual_seed(seed)
    amplitudes = posterior.amplitudes(cost)
    log_probs, fractions = [], []
    for _ in range(num_masks):
        gates = _draw(posterior, cost, generator)
        with gated.gates_set(gates, amplitudes):
            log_probs.append(_token_log_probs(gated, windows, batch_size))
        fractions.append(float(posterior.sizes.kept_fraction(gates)))
    return torch.stack(log_probs), torch.tensor(fractions, dtype=torch.float64)


def predicted_quality(gated: GatedModel, posterior: GatePosterior, windows: torch.Tensor, costs, num_masks: int = 8,
                      bootstrap: int = 200, level: float = 0.9, seed: int = 0, progress: bool = True) -> list[dict]:
    """Per cost: predicted perplexity (mean over sampled sub-networks) and a ``level`` band.

    The band is taken over bootstrap replicates that resample both the sub-networks
    and the validation windows, so it covers the choice of sub-network and the
    noise of a small validation budget.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    rows = []
    for cost in tqdm(costs, desc="predicting", disable=not progress):
        log_probs, fractions = sampled_log_probs(gated, posterior, windows, float(cost), num_masks, seed)
        per_window = -log_probs.mean(-1)                                      # (mask, window) NLL
        low, high = _band(per_window, bootstrap, level, generator)
        nll = per_window.mean().item()
        rows.append({"cost": float(cost), "fraction": float(fractions.mean()), "nll": nll,
                     "perplexity": math.exp(nll), "perplexity_low": math.exp(low),
                     "perplexity_high": math.exp(high), "level": level, "masks": num_masks,
                     "tokens": int(log_probs.shape[1] * log_probs.shape[2]),
                     "mask_perplexities": [math.exp(v) for v in per_window.mean(-1).tolist()]})
    return rows


def _band(per_window: torch.Tensor, bootstrap: int, level: float, generator: torch.Generator) -> tuple[float, float]:
    """Bootstrap ``level`` interval of the mean NLL of ``(mask, window)`` values, resampling masks and windows."""
    masks, count = per_window.shape
    pick_masks = torch.randint(0, masks, (bootstrap, masks), generator=generator)
    pick_windows = torch.randint(0, count, (bootstrap, count), generator=generator)
    resampled = per_window[pick_masks]                                          # (replicate, mask, window)
    replicates = torch.gather(resampled, 2, pick_windows[:, None, :].expand(-1, masks, -1)).mean((1, 2))
    low, high = torch.quantile(replicates, torch.tensor([(1 - level) / 2, (1 + level) / 2]))
    return low.item(), high.item()


@torch.no_grad()
def plan_quality(gated: GatedModel, plan, amplitudes: dict[str, torch.Tensor], windows: torch.Tensor,
                 bootstrap: int = 200, level: float = 0.9, seed: int = 0, batch_size: int = 8) -> dict:
    """Predicted perplexity of the sub-network a plan would extract, from its hard gates (no extraction),
    with a bootstrap band over the validation windows."""
    gates = plan.gates(gated.kinds, gated.values.units)
    with gated.gates_set(gates, amplitudes):
        per_window = -_token_log_probs(gated, windows, batch_size).mean(-1)[None]
    low, high = _band(per_window, bootstrap, level, torch.Generator().manual_seed(seed + 1))
    nll = per_window.mean().item()
    return {"fraction": plan.fraction, "nll": nll, "perplexity": math.exp(nll), "perplexity_low": math.exp(low),
            "perplexity_high": math.exp(high), "level": level, "tokens": int(windows[:, 1:].numel())}


SELECTION_WINDOWS = 16  # validation windows a chain's plan is scored on when a fit selects its chain


def plan_selection(target, totals, windows: torch.Tensor, form: str = "per-layer", multiple: int = 1,
                   adapter_share: float = 1.0):
    """A ``select`` for :func:`bayesprune.core.fit.fit`: a chain's score is the NLL per token, on ``windows``,
    of the sub-network its posterior plans for ``target`` (hard gates, no extraction), with its network in place
    and its adapters, if any, at ``adapter_share`` of their size (as the cut will merge them).

    Measured against the validation loss, which averages every cost (``bench/calibration.py --rules``, pairs of
    seeds of eight settings): it picks the better of two chains' cuts at the target more often (108 of 152 against
    91), and its pick is 0.7 % worse than the better one on average, against 1.5 %.
    """
    def score(posterior: GatePosterior, gated: GatedModel) -> float:
        plan = posterior.plan(target, totals, form, multiple)
        with adapters_scaled(gated.model, adapter_share):
            return plan_quality(gated, plan, posterior.amplitudes(plan.cost, point=True), windows)["nll"]
    return score


@torch.no_grad()
def ensemble_nll(gated: GatedModel, posterior: GatePosterior, windows: torch.Tensor, cost: float, num_masks: int = 4,
                 seed: int = 0) -> dict:
    """NLL per token of the posterior-predictive ensemble of ``num_masks`` sub-networks at ``cost``,
    next to its members' NLLs."""
    log_probs, fractions = sampled_log_probs(gated, posterior, windows, cost, num_masks, seed)
    mixture = torch.logsumexp(log_probs, 0) - math.log(num_masks)
    members = (-log_probs.mean((1, 2))).tolist()
    return {"cost": cost, "masks": num_masks, "ensemble_nll": -mixture.mean().item(),
            "member_nll": members, "mean_member_nll": sum(members) / num_masks,
            "member_fractions": fractions.tolist()}

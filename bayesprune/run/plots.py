"""Figures of a gate posterior that stay readable from 30 blocks to 10⁵ neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.posterior import GatePosterior


def _pyplot():
    """pyplot with the backend as the session has it: the figures here are saved and closed, never shown, and
    forcing a backend would stop a notebook from showing its own figures afterwards."""
    import matplotlib.pyplot as plt

    return plt


def plot_block_forest(idata, kinds: list[str], num_layers: int, cost: float, path: str | Path) -> None:
    """Forest plot of the per-layer inclusion of block, attn and mlp gates at ``cost`` (94 % HDI)."""
    import arviz as az

    plt = _pyplot()
    nearest = float(idata.posterior["cost"].sel(cost=cost, method="nearest"))
    axes = az.plot_forest(idata, var_names=[f"{k}_inclusion" for k in kinds], coords={"cost": nearest},
                          combined=True, hdi_prob=0.94, figsize=(7, 2 + 0.3 * num_layers))
    axes[0].set_title(f"Posterior inclusion probability at cost {nearest:.3g} (94 % HDI)")
    axes[0].figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(axes[0].figure)


def plot_width(posterior: GatePosterior, cost: float, path: str | Path) -> None:
    """Per width kind at ``cost``: kept fraction per layer with its 94 % HDI, and a layer × unit inclusion map.

    Units in the heat map are sorted by inclusion within each layer, so the kept
    fraction reads as the length of the bright part of each row.
    """
    import arviz as az

    plt = _pyplot()
    kinds = [k for k in posterior.kinds if k in posterior.units]
    layers = np.arange(len(posterior.layer_names))
    p = posterior.inclusion(cost)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 1.5 + 0.22 * len(layers) * len(kinds)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]})
    for row, kind in zip(axes, kinds):
        fraction = p[kind].mean(-1).numpy()
        hdi = az.hdi(fraction[None], hdi_prob=0.94)
        mean = fraction.mean(0)
        row[0].errorbar(mean, layers, xerr=[mean - hdi[:, 0], hdi[:, 1] - mean], fmt="o", ms=3, capsize=2)
        row[0].set(xlim=(0, 1), ylim=(len(layers) - 0.5, -0.5), xlabel=f"expected fraction of {kind}s kept",
                   ylabel="layer", title=f"{kind}s kept per layer (94 % HDI)")
        inclusion = -np.sort(-p[kind].double().mean(0).numpy(), axis=1)
        image = row[1].imshow(inclusion, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        row[1].set(xlabel=f"{kind} (sorted by inclusion within the layer)", ylabel="layer",
                   title=f"{kind} inclusion probability at cost {cost:.3g}")
        fig.colorbar(image, ax=row[1], fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_size_curve(rows: list[dict], path: str | Path) -> None:
    """Expected fraction of decoder parameters kept vs cost, with the 5–95 % range of hard gate draws."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    costs = [r["cost"] for r in rows]
    ax.fill_between(costs, [r["fraction_5%"] for r in rows], [r["fraction_95%"] for r in rows], alpha=0.3,
                    label="5–95 % of gate draws")
    ax.plot(costs, [r["fraction"] for r in rows], "o-", ms=3, label="expected")
    ax.set(xscale="symlog", xlabel="cost λ (nats per token for the whole network)",
           ylabel="fraction of decoder parameters kept", ylim=(0, 1.02), title="Kept size vs cost (one fit)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_thresholds(posterior: GatePosterior, path: str | Path, count: int = 40) -> None:
    """Threshold curves over the cost: one line per layer (posterior median), one panel per unit kind."""
    plt = _pyplot()
    kinds = posterior.kinds
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    positions = np.linspace(0, 0.99, count)
    for ax, kind in zip(axes[0], kinds):
        layers = np.stack([posterior.thresholds(kind, float(t / (1 - t))).median(0).values.numpy()
                           for t in positions], -1)
        colours = plt.cm.viridis(np.linspace(0, 1, layers.shape[0]))
        for layer, colour in zip(layers, colours):
            ax.plot(positions, layer, color=colour, lw=0.8)
        ax.set(xlabel="λ / (1 + λ)", ylabel="threshold", title=f"{kind} (colour: layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_inclusion_over_cost(idata, path: str | Path, hdi_prob: float = 0.94) -> None:
    """Per unit kind, each layer's kept share (width kinds) or inclusion (layer kinds) against the cost with its
    posterior HDI band, and the expected kept fraction of the decoder: ``az.plot_hdi`` on the InferenceData."""
    import arviz as az

    plt = _pyplot()
    posterior = idata.posterior
    costs = posterior["cost"].values
    kinds = [name.removesuffix("_threshold") for name in posterior.data_vars if name.endswith("_threshold")]
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(4.5 * (len(kinds) + 1), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        name = f"{kind}_kept_fraction" if f"{kind}_kept_fraction" in posterior else f"{kind}_inclusion"
        layers = posterior["layer"].values
        colours = plt.cm.viridis(np.linspace(0, 1, len(layers)))
        for layer, colour in zip(layers, colours):
            values = posterior[name].sel(layer=layer).values                   # (chain, draw, cost)
            az.plot_hdi(costs, values, hdi_prob=hdi_prob, ax=ax, color=colour, smooth=False,
                        fill_kwargs={"alpha": 0.15})
            ax.plot(costs, values.mean((0, 1)), color=colour, lw=0.8)
        ax.set(ylim=(0, 1.02), xlabel="cost λ", title=f"{kind}: {name.split('_', 1)[1]} per layer",
               ylabel="posterior mean and 94 % HDI (colour: layer)")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlim(0, costs.max())
    ax = axes[0][-1]
    kept = posterior["kept_fraction"].values
    az.plot_hdi(costs, kept, hdi_prob=hdi_prob, ax=ax, color="navy", smooth=False, fill_kwargs={"alpha": 0.3})
    ax.plot(costs, kept.mean((0, 1)), "o-", color="navy", ms=3)
    ax.set(ylim=(0, 1.02), xlabel="cost λ", ylabel="expected fraction of decoder parameters",
           title="kept size (one fit)")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlim(0, costs.max())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

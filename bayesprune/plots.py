"""Figures of a gate posterior that stay readable from 30 blocks to 10⁵ neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .posterior import GatePosterior


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_block_forest(idata, kinds: list[str], num_layers: int, path: str | Path) -> None:
    """Forest plot of the per-layer inclusion of block, attn and mlp gates (94 % HDI)."""
    import arviz as az

    plt = _pyplot()
    axes = az.plot_forest(idata, var_names=[f"{k}_inclusion" for k in kinds], combined=True, hdi_prob=0.94,
                          figsize=(7, 2 + 0.3 * num_layers))
    axes[0].set_title("Posterior inclusion probability (94 % HDI)")
    axes[0].figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(axes[0].figure)


def plot_width(posterior: GatePosterior, path: str | Path) -> None:
    """Per width kind: kept fraction per layer with its 94 % HDI, and a layer × unit inclusion map.

    Units in the heat map are sorted by inclusion within each layer, so the kept
    fraction reads as the length of the bright part of each row.
    """
    import arviz as az

    plt = _pyplot()
    kinds = [k for k in posterior.kinds if posterior.units(k) is not None]
    layers = np.arange(len(posterior.layer_names))
    fig, axes = plt.subplots(len(kinds), 2, figsize=(12, 1.5 + 0.22 * len(layers) * len(kinds)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]})
    for row, kind in zip(axes, kinds):
        fraction = posterior.layer_kept_fraction(kind).numpy()
        hdi = az.hdi(fraction[None], hdi_prob=0.94)
        mean = fraction.mean(0)
        row[0].errorbar(mean, layers, xerr=[mean - hdi[:, 0], hdi[:, 1] - mean], fmt="o", ms=3, capsize=2)
        row[0].set(xlim=(0, 1), ylim=(len(layers) - 0.5, -0.5), xlabel=f"expected fraction of {kind}s kept",
                   ylabel="layer", title=f"{kind}s kept per layer (94 % HDI)")
        inclusion = -np.sort(-posterior.inclusion_mean(kind).numpy(), axis=1)
        image = row[1].imshow(inclusion, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        row[1].set(xlabel=f"{kind} (sorted by inclusion within the layer)", ylabel="layer",
                   title=f"{kind} inclusion probability")
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


def plot_thresholds(curve, path: str | Path, count: int = 60) -> None:
    """Learned threshold curves: one line per layer, one panel per unit kind, shared curve in black."""
    import torch

    plt = _pyplot()
    kinds = curve.gates.kinds
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.6), squeeze=False)
    positions = np.linspace(0, 0.99, count)
    costs = positions / (1 - positions)
    with torch.no_grad():
        for ax, kind in zip(axes[0], kinds):
            layers = np.stack([curve.gates.threshold(kind, float(c)).numpy() for c in costs], -1)
            colours = plt.cm.viridis(np.linspace(0, 1, layers.shape[0]))
            for layer, colour in zip(layers, colours):
                ax.plot(positions, layer, color=colour, lw=0.8)
            shared = [float(curve.gates.thresholds[kind](float(t))) for t in positions]
            ax.plot(positions, shared, "k--", lw=1.5, label="shared curve")
            ax.set(xlabel="λ / (1 + λ)", ylabel="threshold", title=f"{kind} (colour: layer)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

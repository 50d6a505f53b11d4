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

"""What every benchmark script shares: writing its JSON (and plot) and a headless pyplot."""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def write_results(result: dict, out: str | Path, plot=None) -> Path:
    """``out`` as JSON; with ``plot(rows, path)``, a PNG of ``result["rows"]`` beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if plot is not None:
        plot(result["rows"], out.with_suffix(".png"))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot is not None else ""))
    return out

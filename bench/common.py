"""What every benchmark script shares: writing its JSON (and plot) and a headless pyplot."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def median_seconds(call, rounds: int) -> float:
    """The median wall time of ``rounds`` calls of ``call()``."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> None:
    """Lay ``fig`` out inside ``rect`` (figure fractions; default all of it), write it, close it."""
    fig.tight_layout(rect=rect)
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


def plot_frontier(groups: dict[str, list[dict]], path: str | Path, title: str, dense: float | None = None) -> None:
    """Test perplexity (log scale) against the fraction of decoder parameters kept, one line per group."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, members in groups.items():
        members = sorted(members, key=lambda r: r["fraction"])
        ax.plot([r["fraction"] for r in members], [r["perplexity"] for r in members], "o-", label=label)
    if dense is not None:
        ax.axhline(dense, color="k", ls=":", label="dense")
    ax.set(xlabel="fraction of decoder parameters kept", ylabel="test perplexity (log scale)", yscale="log",
           title=title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def default_model_and_corpora(seq_len: int = 128):
    """The default model, its test corpora (Shakespeare test plays, KJV test books) and its fit windows
    in the seeded (0) shuffle the depth benchmarks calibrate on (SLEB takes the first 8)."""
    import torch

    import bayesprune as bp
    from bayesprune.inputs.data import bible_path

    model, tokenizer = bp.load_model()
    splits = bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))
    bible = bp.inputs.data.split_documents(bp.inputs.data.load_documents(bible_path()))["test"]
    corpora = {"shakespeare": splits["test"], "kjv": bp.tokenize(tokenizer, bible)}
    fit_windows = bp.windows(splits["fit"], seq_len)
    shuffled = fit_windows[torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))]
    return model, corpora, shuffled


EXTRACTION = "extraction."  # settings of the cut, not of the run


def run_config(settings: list[str], **fit):
    """The default run config with ``settings`` (``SECTION.FIELD=JSON``, as ``--set`` gives them; those of
    ``extraction`` are :func:`extraction_config`'s) and ``fit`` fields applied; an unknown setting ends the script."""
    import bayesprune

    values = bayesprune.RunConfig().to_dict()
    for setting in settings:
        key, _, value = setting.partition("=")
        if key.startswith(EXTRACTION):
            continue
        section, _, field = key.partition(".")
        if section not in values or not isinstance(values[section], dict) or field not in values[section]:
            raise SystemExit(f"--set {setting}: no setting {key}")
        values[section][field] = json.loads(value)
    values["fit"] |= fit
    return bayesprune.RunConfig.from_dict(values)


def extraction_config(settings: list[str], **fields):
    """The default extraction with the ``extraction.FIELD=JSON`` ones of ``settings`` and ``fields`` applied; an
    unknown or invalid one ends the script."""
    import bayesprune

    values = {key.removeprefix(EXTRACTION): json.loads(value) for key, _, value in
              (setting.partition("=") for setting in settings) if key.startswith(EXTRACTION)}
    try:
        return bayesprune.ExtractionConfig(**values | fields)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"--set {EXTRACTION}…: {error}") from None

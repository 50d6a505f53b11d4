"""The main job and its run directory: fit → posterior → extract → evaluate → report.

A run directory holds ``config.json`` (how it was made), ``checkpoint.safetensors``
(resumable fit state), ``posterior.safetensors`` (draws that extraction reads),
``posterior.nc`` (ArviZ InferenceData), ``summary.csv`` (``az.summary``),
``forest.png``, ``report.json`` and, with a target, ``extracted/`` (a Hugging Face
folder with the tokenizer).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .config import RunConfig
from .data import load_splits, windows
from .evaluate import model_size, perplexity
from .extract import Target, choose_layers, extract_layers, save_extracted
from .fit import CHECKPOINT_FILE, fit, load_network
from .gates import gate
from .io import atomic_write_json, atomic_write_text, load_tensors
from .models import load_model
from .posterior import POSTERIOR_FILE, GatePosterior

CONFIG_FILE = "config.json"


def _prepare_run_dir(run_dir: Path, config: RunConfig) -> None:
    existing = run_dir / CONFIG_FILE
    if existing.exists():
        if RunConfig.load(existing).to_dict() != config.to_dict():
            raise FileExistsError(f"{run_dir} holds a run with a different configuration; "
                                  f"choose another --out (same settings resume it)")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} exists and is not a bayesprune run directory")
    config.save(existing)


def _write_plots_and_tables(run_dir: Path, posterior: GatePosterior) -> dict:
    import arviz as az
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idata = posterior.to_inference_data()
    idata.to_netcdf(run_dir / "posterior.nc")
    names = [f"{k}_inclusion" for k in posterior.kinds]
    atomic_write_text(run_dir / "summary.csv", az.summary(idata, var_names=names, kind="stats").to_csv())
    axes = az.plot_forest(idata, var_names=names, combined=True, hdi_prob=0.94,
                          figsize=(7, 2 + 0.3 * len(posterior.layer_names)))
    axes[0].set_title("Posterior inclusion probability (94 % HDI)")
    axes[0].figure.savefig(run_dir / "forest.png", dpi=120, bbox_inches="tight")
    plt.close(axes[0].figure)
    return {"posterior": str(run_dir / POSTERIOR_FILE), "inference_data": str(run_dir / "posterior.nc"),
            "summary": str(run_dir / "summary.csv"), "forest_plot": str(run_dir / "forest.png")}


def format_ranking(rows: list[dict]) -> str:
    lines = [f"{'rank':>4}  {'block':<22}{'inclusion':>10}  {'94% HDI':<17}{'P(removed | k)':>15}"]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['layer']:<22}{r['inclusion']:>10.4f}  "
                     f"[{r['hdi_3%']:.3f}, {r['hdi_97%']:.3f}]  {r['p_removed_if_k']:>8.3f} (k={r['k']})")
    return "\n".join(lines)


def run_fit(config: RunConfig, run_dir: str | Path, target: str | None = "0.75",
            progress: bool = True, log=print) -> dict:
    """Fit the gate posterior, summarise it, and (with ``target``) extract and evaluate."""
    started = time.time()
    run_dir = Path(run_dir)
    parsed_target = Target.parse(target) if target is not None else None
    model, tokenizer = load_model(config.model)
    splits = load_splits(tokenizer, config.data)
    _prepare_run_dir(run_dir, config)

    def evaluate(model) -> dict:
        return perplexity(model, splits["test"], config.data.eval_window, config.data.eval_tokens,
                          progress=progress)

    log("tokens: " + ", ".join(f"{name} {splits[name].numel():,}" for name in ("fit", "validation", "test")))
    dense = {**evaluate(model), **model_size(model)}
    log(f"dense model: test perplexity {dense['perplexity']:.3f}, {dense['parameters']:,} parameters")

    gated = gate(model, config.gate)
    result = fit(gated, windows(splits["fit"], config.fit.seq_len), config.fit, config.prior,
                 run_dir=run_dir, progress=progress)
    posterior = result.posterior()
    posterior.save(run_dir / POSTERIOR_FILE)
    files = _write_plots_and_tables(run_dir, posterior)
    rows = posterior.summary()
    log(format_ranking(rows))
    kept = posterior.kept_fraction_draws()
    report = {
        "config": config.to_dict(), "dense": dense, "ranking": rows,
        "elbo_per_token": {"first": result.history[0] if result.history else None,
                           "last": result.history[-1] if result.history else None},
        "kept_fraction_under_posterior": {"mean": kept.mean().item(), "sd": kept.std().item()},
    }
    model = gated.remove()
    if parsed_target is not None:
        out = run_dir / "extracted"
        small, record = _extract_and_save(model, tokenizer, posterior, parsed_target, run_dir, out, overwrite=True)
        extracted = {**evaluate(small), **record}
        report["extracted"] = extracted
        files["extracted_model"] = str(out)
        log(f"extracted ({parsed_target}): kept {len(record['kept_layers'])}/{len(posterior.layer_names)} blocks, "
            f"test perplexity {extracted['perplexity']:.3f} (dense {dense['perplexity']:.3f}), "
            f"{extracted['parameters']:,} parameters")
    report["files"] = files
    report["wall_seconds"] = time.time() - started
    atomic_write_json(run_dir / "report.json", report)
    files["report"] = str(run_dir / "report.json")
    log("wrote:\n" + "\n".join(f"  {k}: {v}" for k, v in files.items()))
    return report


def _extract_and_save(model, tokenizer, posterior: GatePosterior, target: Target, run_dir: Path,
                      out: str | Path, overwrite: bool):
    """Choose blocks for ``target``, cut the model and save it; returns the model and its record."""
    keep = choose_layers(model, posterior, target)
    small = extract_layers(model, keep)
    removed = [i for i in range(len(posterior.layer_names)) if i not in keep]
    keep_p = posterior.block_keep_probability().mean(0)
    record = {"source_run": str(run_dir), "target": str(target), "kept_layers": keep,
              "removed_layers": [posterior.layer_names[i] for i in removed],
              "removed_inclusion": [keep_p[i].item() for i in removed]}
    save_extracted(small, tokenizer, out, record, overwrite=overwrite)
    return small, {**record, **model_size(small, out), "path": str(out)}


def load_fitted_model(run_dir: str | Path):
    """The run's network (with jointly trained weights if it had them) and tokenizer."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a bayesprune run directory (no {CONFIG_FILE})")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    model, tokenizer = load_model(config.model)
    if config.fit.weights == "joint":
        tensors, _ = load_tensors(run_dir / CHECKPOINT_FILE)
        with torch.no_grad():
            load_network(model, tensors)
    return model, tokenizer


def run_extract(run_dir: str | Path, target: str, out: str | Path, overwrite: bool = False) -> dict:
    """Extract a sub-network for ``target`` from a fitted run; nothing is written on error."""
    run_dir = Path(run_dir)
    parsed = Target.parse(target)
    posterior = GatePosterior.load(run_dir / POSTERIOR_FILE)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or remove it")
    model, tokenizer = load_fitted_model(run_dir)
    return _extract_and_save(model, tokenizer, posterior, parsed, run_dir, out, overwrite)[1]

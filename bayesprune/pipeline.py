"""The main job and its run directory: fit → posterior → extract → evaluate → report.

A run directory holds ``config.json`` (how it was made), ``checkpoint.safetensors``
(resumable fit state), ``posterior.safetensors`` (the fitted posterior that extraction reads),
``posterior.nc`` (ArviZ InferenceData; with head or neuron gates only its first
``UNIT_LEVEL_DRAWS`` draws, to keep the file small: ``posterior.safetensors`` is the
exact posterior), ``summary.csv`` (``az.summary`` of the per-layer variables),
``forest.png`` (block/branch gates), ``width.png`` (head/neuron gates),
``report.json`` and, with a target, ``extracted/`` (a Hugging Face folder with the
tokenizer).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .amortised_fit import fit_amortised
from .architectures import architecture_for_config
from .config import WIDTH_KINDS, RunConfig
from .cost_curve import CURVE_FILE, CostCurve, cost_grid
from .data import load_splits, windows
from .evaluate import model_size, perplexity
from .fit import CHECKPOINT_FILE, fit, load_network
from .gates import gate
from .io import atomic_write_json, atomic_write_text, load_tensors
from .model import block_on_probability
from .models import load_model, resolve_model
from .plots import plot_block_forest, plot_size_curve, plot_thresholds, plot_width
from .posterior import POSTERIOR_FILE, GatePosterior
from .selection import ModelTotals, Target
from .slicing import CheckpointFiles, extract, extract_streaming, plan_for, save_extracted

CONFIG_FILE = "config.json"
UNIT_LEVEL_DRAWS = 100


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

    width = [k for k in posterior.kinds if posterior.units(k) is not None]
    layer_kinds = [k for k in posterior.kinds if k not in width]
    idata = posterior.to_inference_data(UNIT_LEVEL_DRAWS if width else None)
    idata.to_netcdf(run_dir / "posterior.nc")
    names = [f"{k}_inclusion" for k in layer_kinds] + [f"{k}_kept_fraction" for k in width]
    atomic_write_text(run_dir / "summary.csv", az.summary(idata, var_names=names, kind="stats").to_csv())
    files = {"posterior": str(run_dir / POSTERIOR_FILE), "inference_data": str(run_dir / "posterior.nc"),
             "summary": str(run_dir / "summary.csv")}
    if layer_kinds:
        plot_block_forest(idata, layer_kinds, len(posterior.layer_names), run_dir / "forest.png")
        files["forest_plot"] = str(run_dir / "forest.png")
    if width:
        plot_width(posterior, run_dir / "width.png")
        files["width_plot"] = str(run_dir / "width.png")
    return files


def _table(columns: list[tuple[str, str, object]], rows: list[dict]) -> str:
    """A plain-text table: each column is (title, alignment and width, row -> text)."""
    lines = ["  ".join(f"{title:{spec}}" for title, spec, _ in columns)]
    lines += ["  ".join(f"{str(cell(r)):{spec}}" for _, spec, cell in columns) for r in rows]
    return "\n".join(lines)


def _hdi(r: dict) -> str:
    return f"[{r['hdi_3%']:.3f}, {r['hdi_97%']:.3f}]"


def format_ranking(rows: list[dict]) -> str:
    return _table([("rank", ">4", lambda r: r["rank"]), ("block", "<20", lambda r: r["layer"]),
                   ("inclusion", ">9", lambda r: f"{r['inclusion']:.4f}"), ("94% HDI", "<16", _hdi),
                   ("P(removed | k)", ">14", lambda r: f"{r['p_removed_if_k']:.3f} (k={r['k']})")], rows)


def format_widths(rows: list[dict]) -> str:
    return _table([("kind", "<6", lambda r: r["kind"]), ("block", "<20", lambda r: r["layer"]),
                   ("kept", ">6", lambda r: f"{r['kept_fraction']:.3f}"), ("94% HDI", "<16", _hdi),
                   ("P>1/2", ">10", lambda r: f"{r['units_above_half']}/{r['units']}")], rows)


def run_fit(config: RunConfig, run_dir: str | Path, target: str | None = "0.75",
            progress: bool = True, log=print, form: str = "per-layer", multiple: int = 1) -> dict:
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
    sequences = windows(splits["fit"], config.fit.seq_len)
    if config.amortised is not None:
        fitted, part, files = _fit_amortised(gated, sequences, config, run_dir, progress, log)
    else:
        fitted, part, files = _fit_fixed_cost(gated, sequences, config, run_dir, progress, log)
    report = {"config": config.to_dict(), "dense": dense, **part}
    model = gated.remove()
    if parsed_target is not None:
        out = run_dir / "extracted"
        small, plan = extract(model, fitted, parsed_target, form, multiple)
        record = _record(run_dir, parsed_target, plan, fitted)
        save_extracted(small, tokenizer, out, record, overwrite=True)
        extracted = {**evaluate(small), **record, **model_size(small, out), "path": str(out)}
        report["extracted"] = extracted
        files["extracted_model"] = str(out)
        log(f"extracted ({parsed_target}, {form}): kept {len(plan.layers)}/{plan.num_layers} blocks, "
            f"{plan.fraction:.3f} of decoder parameters, test perplexity {extracted['perplexity']:.3f} "
            f"(dense {dense['perplexity']:.3f}), {extracted['parameters']:,} parameters")
    report["files"] = files
    report["wall_seconds"] = time.time() - started
    atomic_write_json(run_dir / "report.json", report)
    files["report"] = str(run_dir / "report.json")
    log("wrote:\n" + "\n".join(f"  {k}: {v}" for k, v in files.items()))
    return report


def _fit_fixed_cost(gated, sequences, config: RunConfig, run_dir: Path, progress: bool, log):
    """One fit at ``config.prior.cost``: the posterior, its tables and plots."""
    result = fit(gated, sequences, config.fit, config.prior, run_dir=run_dir, progress=progress)
    posterior = result.posterior()
    posterior.save(run_dir / POSTERIOR_FILE)
    files = _write_plots_and_tables(run_dir, posterior)
    rows = posterior.summary() if set(posterior.kinds) - set(WIDTH_KINDS) else []
    if rows:
        log(format_ranking(rows))
    width_rows = posterior.width_summary()
    if width_rows:
        log(format_widths(width_rows))
    kept = posterior.kept_fraction_draws()
    part = {"ranking": rows, "widths": width_rows,
            "elbo_per_token": {"first": result.history[0] if result.history else None,
                               "last": result.history[-1] if result.history else None},
            "kept_fraction_under_posterior": {"mean": kept.mean().item(), "sd": kept.std().item()}}
    return posterior, part, files


def _fit_amortised(gated, sequences, config: RunConfig, run_dir: Path, progress: bool, log):
    """One cost-amortised fit: the cost curve, the kept size at every cost, the threshold curves."""
    result = fit_amortised(gated, sequences, config.fit, config.amortised, run_dir=run_dir, progress=progress)
    curve = CostCurve.from_fit(result)
    curve.save(run_dir / CURVE_FILE)
    with gated.unwrapped() as model:
        rows = curve.size_curve(cost_grid(), ModelTotals.of(model))
    plot_size_curve(rows, run_dir / "size_curve.png")
    plot_thresholds(curve, run_dir / "thresholds.png")
    log(format_size_curve(rows))
    files = {"cost_curve": str(run_dir / CURVE_FILE), "size_curve_plot": str(run_dir / "size_curve.png"),
             "threshold_plot": str(run_dir / "thresholds.png")}
    return curve, {"size_curve": rows, "history_last": result.history[-10:]}, files


def format_size_curve(rows: list[dict]) -> str:
    return _table([("cost", ">8", lambda r: f"{r['cost']:.3f}"), ("kept", ">6", lambda r: f"{r['fraction']:.3f}"),
                   ("5%–95% of draws", "<16", lambda r: f"{r['fraction_5%']:.3f}–{r['fraction_95%']:.3f}"),
                   ("MB", ">8", lambda r: f"{r['megabytes']:.1f}")], rows)


def _record(run_dir: Path, target: Target, plan, fitted) -> dict:
    if isinstance(fitted, CostCurve):
        on = {k: v for k, v in fitted.probabilities(plan.cost).items() if k not in WIDTH_KINDS}
        keep_p = block_on_probability(on, torch.ones(plan.num_layers, dtype=torch.float64))
    else:
        keep_p = fitted.block_keep_probability().mean(0)
    removed = [i for i in range(plan.num_layers) if i not in plan.kept_layers]
    return {"source_run": str(run_dir), "target": str(target), **plan.record(),
            "removed_layer_names": [fitted.layer_names[i] for i in removed],
            "removed_inclusion": [keep_p[i].item() for i in removed]}


def load_fitted(run_dir: str | Path):
    """What a run fitted: its :class:`CostCurve` (cost-amortised run) or :class:`GatePosterior`."""
    run_dir = Path(run_dir)
    if (run_dir / CURVE_FILE).is_file():
        return CostCurve.load(run_dir / CURVE_FILE)
    return GatePosterior.load(run_dir / POSTERIOR_FILE)


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


def run_extract(run_dir: str | Path, target: str, out: str | Path, overwrite: bool = False,
                form: str = "per-layer", multiple: int = 1, streaming: bool | None = None) -> dict:
    """Extract a sub-network for ``target`` from a fitted run; nothing is written on error.

    A frozen-weight fit is cut straight from the original safetensors files
    (``streaming``, the default there), reading only the kept slices; a joint fit,
    whose weights live in the run's checkpoint, is cut in memory.
    """
    run_dir = Path(run_dir)
    parsed = Target.parse(target)
    fitted = load_fitted(run_dir)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or remove it")
    config = RunConfig.load(run_dir / CONFIG_FILE)
    if streaming is None:
        streaming = config.fit.weights == "frozen"
    if streaming:
        if config.fit.weights != "frozen":
            raise ValueError("a joint fit changed the weights: extract it in memory (streaming=False)")
        from transformers import AutoConfig

        source = resolve_model(config.model)
        files = CheckpointFiles(source)
        plan = plan_for(fitted, files.totals(architecture_for_config(AutoConfig.from_pretrained(source))),
                        parsed, form, multiple)
        record = _record(run_dir, parsed, plan, fitted)
        extract_streaming(source, plan, out, record, overwrite)
    else:
        model, tokenizer = load_fitted_model(run_dir)
        small, plan = extract(model, fitted, parsed, form, multiple)
        record = _record(run_dir, parsed, plan, fitted)
        save_extracted(small, tokenizer, out, record, overwrite)
    files_bytes = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {**record, "file_bytes": files_bytes, "path": str(out)}

"""The main job (``bayesprune fit``): validate → fit → posterior → extract → evaluate → report.

A run directory (see :mod:`bayesprune.run.rundir`) holds ``run.json`` (its marker: the
model's absolute path and fingerprint, the data's fingerprint), ``config.json`` (how
it was made), ``checkpoint.safetensors``
(resumable fit state), ``posterior.safetensors`` (the fitted posterior that extraction
reads: any target from one run), ``posterior.nc`` (ArviZ InferenceData over a cost
grid; with head or neuron gates only its first ``UNIT_LEVEL_DRAWS`` draws, to keep
the file small), ``summary.csv`` (``az.summary`` of the per-layer variables at every
cost of the grid), ``inclusion.png`` (inclusion with intervals across the cost),
``size_curve.png``, ``thresholds.png``, ``forest.png`` (block/branch gates) and
``width.png`` (head/neuron gates) at the cost of the target, ``report.json`` and,
with a target, ``extracted/`` (a Hugging Face folder with the tokenizer).
``bayesprune depth`` adds ``depth.json`` (:mod:`bayesprune.run.depth_job`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from ..prune import check_request
from ..core import distributed
from ..core.config import ExtractionConfig, RunConfig
from ..core.kinds import layer_kinds, width_kinds
from ..inputs.data import resolve_corpus, split_corpus, tokenize, windows
from ..evaluation.perplexity import model_size, perplexity
from ..evaluation.prediction import SELECTION_WINDOWS, plan_selection
from ..core.fit import fit
from ..core.gates import gate
from ..core.io import atomic_path, atomic_write_json, atomic_write_text
from ..inputs.pretrained import compute_dtype, load_config, load_model, resolve_model, source_dtype
from .plots import plot_block_forest, plot_inclusion_over_cost, plot_size_curve, plot_thresholds, plot_width
from ..core.posterior import GatePosterior, cost_grid
from .rundir import (RunDir, check_output, claim, data_fingerprint, holding, load_dense_model, load_fitted_model,
                     model_fingerprint)
from ..core.targets import ModelTotals, Target
from ..cut.extraction import save_extracted
from .extract_job import cut_in_memory, extraction_record

UNIT_LEVEL_DRAWS = 20
SUMMARY_TARGET = "0.75"  # where a run without a target shows its ranking and widths


def validate(config: RunConfig, extraction: ExtractionConfig, run_dir: str | Path | None = None) -> Target | None:
    """Check the output folder, model family, gate kinds, sequence lengths and target before any weights are loaded."""
    if run_dir is not None:
        check_output(run_dir, config)
    parsed = extraction.parsed
    distributed.check_batch(config.fit.batch_size, config.cost.per_step, config.fit.chains)
    distributed.check_chains(config.fit.chains)
    model_config = load_config(config.model)
    check_request(model_config, config.gate.units, parsed,
                  {"--seq-len": config.fit.seq_len, "--eval-window": config.data.eval_window}, extraction.multiple)
    if "block" not in config.gate.units:
        for option, value, idle in (("--two-point-blocks", config.fit.two_point_blocks, 0),
                                    ("--block-importance", config.fit.block_importance, "ones")):
            if value != idle:
                raise ValueError(f"{option} {value} acts on block gates, and this run gates "
                                 f"{list(config.gate.units)}: add block to --units or leave it out")
    return parsed


def _write_plots_and_tables(run: RunDir, posterior: GatePosterior, cost: float, size_rows: list[dict]) -> dict:
    import arviz as az

    width, layer = width_kinds(posterior.kinds), layer_kinds(posterior.kinds)
    idata = posterior.to_inference_data(sorted(set(posterior.default_costs()) | {cost}),
                                        UNIT_LEVEL_DRAWS if width else None)
    with atomic_path(run / RunDir.INFERENCE_DATA) as tmp:
        idata.to_netcdf(str(tmp))
    names = [f"{k}_inclusion" for k in layer] + [f"{k}_kept_fraction" for k in width] + ["kept_fraction"]
    atomic_write_text(run / RunDir.SUMMARY, az.summary(idata, var_names=names, kind="stats").to_csv())
    files = {"posterior": str(run.posterior), "inference_data": str(run / RunDir.INFERENCE_DATA),
             "summary": str(run / RunDir.SUMMARY)}
    plots = {"inclusion_plot": lambda path: plot_inclusion_over_cost(idata, path),
             "threshold_plot": lambda path: plot_thresholds(posterior, path)}
    if len(size_rows) > 1:
        plots["size_curve_plot"] = lambda path: plot_size_curve(size_rows, path)
    if layer:
        plots["forest_plot"] = lambda path: plot_block_forest(idata, layer, len(posterior.layer_names), cost, path)
    if width:
        plots["width_plot"] = lambda path: plot_width(posterior, cost, path)
    for key, draw in plots.items():
        with atomic_path(run / RunDir.PLOTS[key]) as tmp:
            draw(tmp)
        files[key] = str(run / RunDir.PLOTS[key])
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
    columns = [("kind", "<6", lambda r: r["kind"]), ("block", "<20", lambda r: r["layer"]),
               ("kept", ">6", lambda r: f"{r['kept_fraction']:.3f}"), ("94% HDI", "<16", _hdi),
               ("P>1/2", ">10", lambda r: f"{r['units_above_half']}/{r['units']}")]
    if rows and "seed_5%" in rows[0]:
        columns.append(("another seed, 90%", "<18", lambda r: f"[{r['seed_5%']:.3f}, {r['seed_95%']:.3f}]"))
    return _table(columns, rows)


def finished(run: RunDir, config: RunConfig, extraction: ExtractionConfig) -> dict | None:
    """The report of a run that already holds this fit and this extraction (``None``: it does not)."""
    try:
        report = json.loads(run.report.read_text())
    except (OSError, ValueError):
        return None
    asked = json.loads(json.dumps({"config": config.to_dict(), "extraction": extraction.to_dict()}))
    same = isinstance(report, dict) and all(report.get(key) == value for key, value in asked.items())
    return report if same and run.posterior.is_file() else None


def check_extracted(run: RunDir) -> None:
    """Refuse to replace ``RUN/extracted`` while it holds files the fit job did not write there (``--force``
    replaces it all the same)."""
    if not run.extracted.is_dir():
        return
    try:
        written = set(json.loads(run.report.read_text())["extracted"]["files"])
    except (OSError, ValueError, KeyError, TypeError):
        written = None  # a report from before the file list: nothing to tell the user's files by
    extra = sorted(p.name for p in run.extracted.iterdir() if written is not None and p.name not in written)
    if extra:
        raise FileExistsError(f"{run.extracted} holds files the fit did not write ({', '.join(extra[:5])}); move "
                              f"them out, or pass --force to replace the folder with them")


def run_fit(config: RunConfig, run_dir: str | Path, extraction: ExtractionConfig | None = None,
            progress: bool = True, log=print, device: str | None = None, force: bool = False) -> dict:
    """Fit the cost-conditioned gate posterior, summarise it, and (with a target) extract and evaluate.

    The network runs on ``device`` in ``config.fit.dtype``; the extracted model is written in
    the dtype the source model is stored in, and byte targets count that dtype's bytes.
    Launched on several processes (``torchrun``, ``accelerate launch``), they fit together
    and only the first writes and reports; the others return ``{}``. A run that already holds this
    fit and this extraction is left as it is (its report is returned) unless ``force``.
    """
    started = time.time()
    device = distributed.initialise(device)
    run = RunDir(run_dir)
    config = config.resolved(resolve_corpus(config.data.path))
    extraction = extraction or ExtractionConfig()
    parsed_target = validate(config, extraction, run.path)
    with holding(run.path, "fit") if distributed.is_main() else contextlib.nullcontext():
        return _fit_in(run, config, extraction, parsed_target, started, progress, log, device, force)


def fit_dtype(fit_config, device) -> torch.dtype:
    """The dtype the network computes in: ``auto`` is :func:`native_dtype`, except for jointly trained weights,
    which stay float32 (a bfloat16 weight cannot take an update as small as the weights' learning rate)."""
    if fit_config.dtype == "auto" and fit_config.weights == "joint":
        return torch.float32
    return compute_dtype(fit_config.dtype, device)


def _fit_in(run: RunDir, config: RunConfig, extraction: ExtractionConfig, parsed_target: Target | None,
            started: float, progress: bool, log, device, force: bool) -> dict:
    """:func:`run_fit` once the run directory is held."""
    corpus = split_corpus(config.data)  # the text is read and checked before any weights
    stored = source_dtype(config.model)
    model, tokenizer = load_model(config.model, device, stored)
    splits = {name: tokenize(tokenizer, documents) for name, documents in corpus.items()}
    done = None if force else finished(run, config, extraction)
    claim(run.path, config, model_fingerprint(resolve_model(config.model)), data_fingerprint(splits),
          write=distributed.is_main() and done is None)  # a finished run is checked against its model and data
    if done is not None:
        log(f"{run} already holds this fit" + (f" and its extraction ({done['extracted']['path']}: test perplexity "
                                                f"{done['extracted']['perplexity']:.3f})" if "extracted" in done else "")
            + "; nothing was rewritten (--force redoes the summaries, plots and extraction)")
        return done if distributed.is_main() else {}
    if parsed_target is not None and not force:
        check_extracted(run)

    def evaluate(model) -> dict:
        return perplexity(model, splits["test"], config.data.eval_window, config.data.eval_tokens,
                          progress=progress)

    log("tokens: " + ", ".join(f"{name} {splits[name].numel():,}" for name in ("fit", "validation", "test")))
    seconds = {"load": time.time() - started}
    if distributed.is_main():
        with _timed(seconds, "dense_evaluation"):
            dense = {**evaluate(model), **model_size(model)}
        log(f"dense model: test perplexity {dense['perplexity']:.3f}, {dense['parameters']:,} parameters")

    totals = ModelTotals.of(model, stored)
    select = None
    if parsed_target is not None and config.fit.chains > 1:  # the chain whose cut at the target reads best
        scored = windows(splits["validation"], config.data.eval_window) \
            if splits["validation"].numel() >= config.data.eval_window else windows(splits["fit"], config.fit.seq_len)
        select = plan_selection(parsed_target, totals, scored[:SELECTION_WINDOWS], extraction.form, extraction.multiple,
                                extraction.adapter_share)
    gated = gate(model.to(fit_dtype(config.fit, model.device)), config.gate)
    validation = windows(splits["validation"], config.fit.seq_len) \
        if splits["validation"].numel() >= config.fit.seq_len else None
    with _timed(seconds, "fit"):
        result = fit(gated, windows(splits["fit"], config.fit.seq_len), config.fit, config.prior, config.cost,
                     checkpoint=run.checkpoint, progress=progress, validation=validation, select=select)
    seconds |= {f"fit_{part}": value for part, value in result.seconds.items()}
    if not distributed.is_main():
        return {}
    if any(result.critical_units.values()):
        log("critical units (removal alone broke the network; the prior keeps them in): " + "; ".join(
            f"{kind} {', '.join(f'{layer}.{unit}' for layer, unit in units)}"
            for kind, units in result.critical_units.items()))
    summarising = time.time()
    posterior = result.posterior()
    posterior.save(run.posterior)
    model = gated.remove()
    log(f"the network computed in {_name(model.dtype)}; dense and extracted models are scored in {_name(stored)}")
    plan = None
    if parsed_target is not None:
        plan = posterior.plan(parsed_target, totals, extraction.form, extraction.multiple)
    cost = plan.cost if plan is not None else posterior.plan(SUMMARY_TARGET, totals).cost
    costs = [posterior.fixed_cost] if posterior.fixed_cost is not None else cost_grid()
    size_rows = posterior.size_curve(costs, totals)
    files = _write_plots_and_tables(run, posterior, cost, size_rows)
    report = {"config": config.to_dict(), "compute_dtype": _name(model.dtype),
              "extraction": extraction.to_dict(), "dense": dense,
              **_summaries(posterior, cost, size_rows, log), "chains": result.chains, "selected_chain": result.chain,
              "critical_units": result.critical_units,
              "convergence": _convergence(posterior, cost, result.chains, parsed_target, log),
              "loss": {"first": result.history[0] if result.history else None,
                       "last": result.history[-10:]}}
    seconds["summaries"] = time.time() - summarising
    if plan is not None:
        out = run.extracted
        share = extraction.adapter_share if config.fit.weights == "lora" else 1.0
        with _timed(seconds, "extraction"):
            if model.dtype != stored or share != 1:  # the stored weights (adapters merged at full precision, at
                model, _ = load_fitted_model(run.path, device, stored, share)  # their share), not their rounding
            small, after = cut_in_memory(model, plan, extraction, lambda: splits["fit"], config.fit.seq_len, stored,
                                         lambda: load_dense_model(run.path, device), progress)
            record = extraction_record(run.path, extraction, plan, posterior, after=after)
            save_extracted(small, tokenizer, out, record, overwrite=True)
        with _timed(seconds, "extracted_evaluation"):
            extracted = {**evaluate(small), **record, **model_size(small, out), "path": str(out),
                         "files": sorted(p.name for p in out.iterdir())}
        report["extracted"] = extracted
        files["extracted_model"] = str(out)
        if "recovery" in after:
            done = after["recovery"]
            log(f"recovery: {done['steps']} steps on the fit split, {done['likelihood']} {done['first_loss']:.3f} -> "
                f"{done['last_loss']:.3f} (last 10 steps), {done['seconds']:.0f} s")
        log(f"extracted ({parsed_target}, {extraction.form}) at cost {plan.cost:.3f}: kept {len(plan.layers)}/"
            f"{plan.num_layers} blocks, {plan.fraction:.3f} of decoder parameters, test perplexity "
            f"{extracted['perplexity']:.3f} (dense {dense['perplexity']:.3f}), {extracted['parameters']:,} parameters")
    report["files"] = files
    report["wall_seconds"] = time.time() - started
    report["seconds"] = seconds
    log(format_seconds(seconds, report["wall_seconds"]))
    atomic_write_json(run.report, report)
    files["report"] = str(run.report)
    log("wrote:\n" + "\n".join(f"  {k}: {v}" for k, v in files.items()))
    return report


@contextlib.contextmanager
def _timed(seconds: dict, phase: str):
    """Add the block's wall time to ``seconds[phase]``."""
    began = time.time()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.time() - began


def format_seconds(seconds: dict, wall: float) -> str:
    """One line: where the job's wall time went."""
    def s(phase):
        return f"{seconds[phase]:,.0f} s"

    parts = [f"load {s('load')}"] + ([f"dense evaluation {s('dense_evaluation')}"] if "dense_evaluation" in seconds
                                     else [])
    parts.append(f"fit {s('fit')} (critical-unit scan {s('fit_scan')}, SVI steps {s('fit_steps')})")
    parts.append(f"posterior summaries and plots {s('summaries')}")
    if "extraction" in seconds:
        parts += [f"extraction {s('extraction')}", f"evaluation of the cut {s('extracted_evaluation')}"]
    return "time: " + ", ".join(parts) + f"; {wall:,.0f} s in all"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _summaries(posterior: GatePosterior, cost: float, size_rows: list[dict], log) -> dict:
    """The ranking (layer kinds) and widths (width kinds) at ``cost``, and the size curve, logged and returned."""
    rows = posterior.summary(cost) if layer_kinds(posterior.kinds) else []
    width_rows = posterior.width_summary(cost)
    log(f"posterior at cost {cost:.3f}:")
    if rows:
        log(format_ranking(rows))
    if width_rows:
        log(format_widths(width_rows))
    log(format_size_curve(size_rows))
    return {"summary_cost": cost, "ranking": rows, "widths": width_rows, "size_curve": size_rows}


R_HAT_LIMIT = 1.05  # above it, a layer's chains disagree


def _convergence(posterior: GatePosterior, cost: float, chains: list[dict], target: Target | None,
                 log) -> list[dict]:
    """R-hat and ESS of every layer at ``cost`` across the fit's chains, logged per kind, with a warning naming
    the layers whose R-hat is above ``R_HAT_LIMIT`` (nothing to compare with one chain), after what the chain
    the plan reads was selected by (with a ``target``: its plan's predicted perplexity)."""
    if posterior.num_chains < 2:
        log("one chain: fit with --chains 2 or more to see whether fits from other seeds agree (R-hat)")
        return []
    rows = posterior.convergence(cost)
    log(f"{posterior.num_chains} chains, validation loss per token "
        + ", ".join(f"{c['validation_loss']:.4f}" for c in chains)
        + ("" if target is None else f"; predicted perplexity of each chain's cut at {target} on "
           f"{SELECTION_WINDOWS} validation windows " + ", ".join(f"{math.exp(c['score']):.3f}" for c in chains))
        + f"; the plan reads chain {posterior.chain} (seed {chains[posterior.chain]['seed']})")
    log(f"convergence at cost {cost:.3f} (R-hat and bulk ESS of each layer's inclusion or kept share):")
    for kind in posterior.kinds:
        mine = [r for r in rows if r["kind"] == kind]
        worst = max(mine, key=lambda r: -1.0 if math.isnan(r["r_hat"]) else r["r_hat"])
        log(f"  {kind:<7} R-hat max {worst['r_hat']:.3f} ({worst['layer']}), bulk ESS min "
            f"{min(r['ess_bulk'] for r in mine):.0f}")
        high = [r["layer"] for r in mine if r["r_hat"] > R_HAT_LIMIT]
        if high:
            log(f"warning: {kind} R-hat above {R_HAT_LIMIT} in {len(high)} of {len(mine)} layers ("
                + ", ".join(high[:8]) + (" …" if len(high) > 8 else "")
                + "): the chains disagree there; the intervals pool them, the plan reads the selected chain")
    return rows


def format_size_curve(rows: list[dict]) -> str:
    return _table([("cost", ">8", lambda r: f"{r['cost']:.3f}"), ("kept", ">6", lambda r: f"{r['fraction']:.3f}"),
                   ("5%–95% of draws", "<16", lambda r: f"{r['fraction_5%']:.3f}–{r['fraction_95%']:.3f}"),
                   ("MB", ">8", lambda r: f"{r['megabytes']:.1f}")], rows)

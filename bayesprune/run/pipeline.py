"""The main job and its run directory: validate → fit → posterior → extract → evaluate → report.

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
``bayesprune depth`` adds ``depth.json``: the depth ranking re-scored conditionally
(:mod:`bayesprune.cut.depth`), which depth targets (``12layers``) then cut by.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..core.adapters import adapter_deltas, merge_checkpoint_adapters
from ..core.architectures import architecture_for_config
from ..prune import check_request
from ..core import distributed
from ..core.config import WIDTH_KINDS, DepthConfig, ExtractionConfig, GateConfig, RunConfig
from ..inputs.data import load_splits, split_corpus, tokenize, windows
from ..cut.depth import DepthSearch, conditional_depth_search
from ..evaluation.perplexity import model_size, perplexity
from ..core.fit import CHECKPOINT_FILE, fit, load_network
from ..core.gates import gate
from ..core.io import atomic_path, atomic_write_json, atomic_write_text, load_tensors
from ..inputs.pretrained import load_config, load_model, resolve_model, source_dtype
from .plots import plot_block_forest, plot_inclusion_over_cost, plot_size_curve, plot_thresholds, plot_width
from ..core.plan import ExtractionPlan
from ..core.posterior import POSTERIOR_FILE, GatePosterior, cost_grid
from .rundir import check_output, claim, data_fingerprint, fitted_model_path, model_fingerprint, read_config
from ..core.selection import choose_blocks
from ..core.targets import ModelTotals, Target, TargetError
from ..cut.extraction import CheckpointFiles, extract_model, extract_streaming, save_extracted

UNIT_LEVEL_DRAWS = 20
DEPTH_FILE = "depth.json"
DEPTH_FORMAT = "bayesprune conditional depth search"
SUMMARY_TARGET = "0.75"  # where a run without a target shows its ranking and widths


def validate(config: RunConfig, extraction: ExtractionConfig, run_dir: str | Path | None = None) -> Target | None:
    """Check the output folder, model family, gate kinds, sequence lengths and target before any weights are loaded."""
    if run_dir is not None:
        check_output(run_dir, config)
    parsed = extraction.parsed
    distributed.check_batch(config.fit.batch_size)
    model_config = load_config(config.model)
    check_request(model_config, config.gate.units, parsed,
                  {"--seq-len": config.fit.seq_len, "--eval-window": config.data.eval_window})
    return parsed


def _write_plots_and_tables(run_dir: Path, posterior: GatePosterior, cost: float, size_rows: list[dict]) -> dict:
    import arviz as az

    width = [k for k in posterior.kinds if k in WIDTH_KINDS]
    layer_kinds = [k for k in posterior.kinds if k not in WIDTH_KINDS]
    idata = posterior.to_inference_data(sorted(set(posterior.default_costs()) | {cost}),
                                        UNIT_LEVEL_DRAWS if width else None)
    with atomic_path(run_dir / "posterior.nc") as tmp:
        idata.to_netcdf(str(tmp))
    names = [f"{k}_inclusion" for k in layer_kinds] + [f"{k}_kept_fraction" for k in width] + ["kept_fraction"]
    atomic_write_text(run_dir / "summary.csv", az.summary(idata, var_names=names, kind="stats").to_csv())
    files = {"posterior": str(run_dir / POSTERIOR_FILE), "inference_data": str(run_dir / "posterior.nc"),
             "summary": str(run_dir / "summary.csv")}
    plots = {"inclusion_plot": ("inclusion.png", lambda path: plot_inclusion_over_cost(idata, path)),
             "threshold_plot": ("thresholds.png", lambda path: plot_thresholds(posterior, path))}
    if len(size_rows) > 1:
        plots["size_curve_plot"] = ("size_curve.png", lambda path: plot_size_curve(size_rows, path))
    if layer_kinds:
        plots["forest_plot"] = ("forest.png", lambda path: plot_block_forest(
            idata, layer_kinds, len(posterior.layer_names), cost, path))
    if width:
        plots["width_plot"] = ("width.png", lambda path: plot_width(posterior, cost, path))
    for key, (name, draw) in plots.items():
        with atomic_path(run_dir / name) as tmp:
            draw(tmp)
        files[key] = str(run_dir / name)
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


def run_fit(config: RunConfig, run_dir: str | Path, extraction: ExtractionConfig | None = None,
            progress: bool = True, log=print, device: str | None = None) -> dict:
    """Fit the cost-conditioned gate posterior, summarise it, and (with a target) extract and evaluate.

    The network runs on ``device`` in ``config.fit.dtype``; the extracted model is written in
    the dtype the source model is stored in, and byte targets count that dtype's bytes.
    Launched on several processes (``torchrun``, ``accelerate launch``), they fit together
    and only the first writes and reports; the others return ``{}``.
    """
    started = time.time()
    device = distributed.initialise(device)
    run_dir = Path(run_dir)
    config = config.resolved()
    extraction = extraction or ExtractionConfig()
    parsed_target = validate(config, extraction, run_dir)
    corpus = split_corpus(config.data)  # the text is read and checked before any weights
    model, tokenizer = load_model(config.model, device, config.fit.dtype)
    splits = {name: tokenize(tokenizer, documents) for name, documents in corpus.items()}
    claim(run_dir, config, model_fingerprint(resolve_model(config.model)), data_fingerprint(splits),
          write=distributed.is_main())

    def evaluate(model) -> dict:
        return perplexity(model, splits["test"], config.data.eval_window, config.data.eval_tokens,
                          progress=progress)

    log("tokens: " + ", ".join(f"{name} {splits[name].numel():,}" for name in ("fit", "validation", "test")))
    if distributed.is_main():
        dense = {**evaluate(model), **model_size(model)}
        log(f"dense model: test perplexity {dense['perplexity']:.3f}, {dense['parameters']:,} parameters")

    gated = gate(model, config.gate)
    result = fit(gated, windows(splits["fit"], config.fit.seq_len), config.fit, config.prior, config.cost,
                 run_dir=run_dir, progress=progress)
    if not distributed.is_main():
        return {}
    posterior = result.posterior()
    posterior.save(run_dir / POSTERIOR_FILE)
    model = gated.remove()
    stored = source_dtype(config.model)
    totals = ModelTotals.of(model, stored)
    plan = None
    if parsed_target is not None:
        plan = posterior.plan(parsed_target, totals, extraction.form, extraction.multiple)
    cost = plan.cost if plan is not None else posterior.plan(SUMMARY_TARGET, totals).cost
    costs = [posterior.fixed_cost] if posterior.fixed_cost is not None else cost_grid()
    size_rows = posterior.size_curve(costs, totals)
    files = _write_plots_and_tables(run_dir, posterior, cost, size_rows)
    report = {"config": config.to_dict(), "dense": dense, **_summaries(posterior, cost, size_rows, log),
              "loss": {"first": result.history[0] if result.history else None,
                       "last": result.history[-10:]}}
    if plan is not None:
        out = run_dir / "extracted"
        small = extract_model(model, plan).to(stored)
        record = _record(run_dir, extraction, plan, posterior)
        save_extracted(small, tokenizer, out, record, overwrite=True)
        extracted = {**evaluate(small), **record, **model_size(small, out), "path": str(out)}
        report["extracted"] = extracted
        files["extracted_model"] = str(out)
        log(f"extracted ({parsed_target}, {extraction.form}) at cost {plan.cost:.3f}: kept {len(plan.layers)}/"
            f"{plan.num_layers} blocks, {plan.fraction:.3f} of decoder parameters, test perplexity "
            f"{extracted['perplexity']:.3f} (dense {dense['perplexity']:.3f}), {extracted['parameters']:,} parameters")
    report["files"] = files
    report["wall_seconds"] = time.time() - started
    atomic_write_json(run_dir / "report.json", report)
    files["report"] = str(run_dir / "report.json")
    log("wrote:\n" + "\n".join(f"  {k}: {v}" for k, v in files.items()))
    return report


def _summaries(posterior: GatePosterior, cost: float, size_rows: list[dict], log) -> dict:
    """The ranking (layer kinds) and widths (width kinds) at ``cost``, and the size curve, logged and returned."""
    rows = posterior.summary(cost) if set(posterior.kinds) - set(WIDTH_KINDS) else []
    width_rows = posterior.width_summary(cost)
    log(f"posterior at cost {cost:.3f}:")
    if rows:
        log(format_ranking(rows))
    if width_rows:
        log(format_widths(width_rows))
    log(format_size_curve(size_rows))
    return {"summary_cost": cost, "ranking": rows, "widths": width_rows, "size_curve": size_rows}


def format_size_curve(rows: list[dict]) -> str:
    return _table([("cost", ">8", lambda r: f"{r['cost']:.3f}"), ("kept", ">6", lambda r: f"{r['fraction']:.3f}"),
                   ("5%–95% of draws", "<16", lambda r: f"{r['fraction_5%']:.3f}–{r['fraction_95%']:.3f}"),
                   ("MB", ">8", lambda r: f"{r['megabytes']:.1f}")], rows)


def _record(run_dir: Path, extraction: ExtractionConfig, plan, posterior: GatePosterior,
            depth: DepthSearch | None = None) -> dict:
    removed = [i for i in range(plan.num_layers) if i not in plan.kept_layers]
    record = {"source_run": str(run_dir.resolve()), "target": str(extraction.parsed),
              "extraction": extraction.to_dict(), **plan.record(),
              "removed_layer_names": [posterior.layer_names[i] for i in removed]}
    if depth is None:
        keep_p = posterior.block_keep_probability(plan.cost).mean(0)
        return {**record, "removed_inclusion": [keep_p[i].item() for i in removed]}
    steps = depth.steps[:len(removed)]
    return {**record, "depth_ranking": {"file": DEPTH_FILE, "score": depth.score, "tokens": depth.tokens,
                                        "removed_in_order": [s.removed for s in steps],
                                        "choice_probability": [s.choice_probability for s in steps]}}


def run_depth_search(run_dir: str | Path, depth: DepthConfig | None = None, device: str | None = None,
                     dtype: str | None = "bfloat16", progress: bool = True) -> DepthSearch:
    """Re-score a fitted run's depth ranking conditionally on seeded fit-split windows, as ``depth`` says;
    writes ``depth.json``.

    The search runs on the run's network (its adapted or trained weights, if it has them) in
    ``dtype``: bfloat16 by default, which on the default model chooses the same blocks as
    float32, several times faster.
    """
    run_dir = Path(run_dir)
    depth = depth or DepthConfig()
    config, fitted = read_config(run_dir), load_fitted(run_dir)
    num_layers = len(fitted.layer_names)
    removals = num_layers // 2 if depth.removals is None else depth.removals
    if not 0 < removals < num_layers:
        raise ValueError(f"removals must be in [1, {num_layers - 1}] for this {num_layers}-block model, got {removals}")
    model, tokenizer = load_fitted_model(run_dir, device, dtype)
    fit_windows = windows(load_splits(tokenizer, config.data)["fit"], config.fit.seq_len)
    order = torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(config.fit.seed))
    gated = gate(model, GateConfig(units=("block",)))
    search = conditional_depth_search(gated, fit_windows[order[:depth.windows]], removals, depth.score,
                                      chunk=depth.chunk, progress=progress)
    atomic_write_json(run_dir / DEPTH_FILE, {"format": DEPTH_FORMAT, "dtype": dtype, **search.record()})
    return search


def read_depth(run_dir: str | Path) -> DepthSearch | None:
    """The run's conditional depth ranking, if ``bayesprune depth`` wrote one."""
    path = Path(run_dir) / DEPTH_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if record.get("format") != DEPTH_FORMAT:
            raise ValueError("no depth-search format marker")
        return DepthSearch.from_record(record)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a bayesprune depth ranking ({error}); rerun 'bayesprune depth'") from None


def run_plan(run_dir: str | Path, posterior: GatePosterior, totals: ModelTotals, target: Target,
             form: str = "per-layer", multiple: int = 1) -> tuple[ExtractionPlan, DepthSearch | None]:
    """The sub-network a run cuts for ``target``, and the depth ranking that chose it (if one did): a block
    count is cut by the run's ``depth.json`` where ``bayesprune depth`` wrote one, any other target by the
    posterior. Everything that cuts a run (extraction, drafts) plans through here."""
    depth = read_depth(run_dir) if target.kind == "layers" else None
    if depth is None:
        return posterior.plan(target, totals, form, multiple), None
    num_layers = len(posterior.layer_names)
    needed = num_layers - int(target.value)
    if needed > len(depth.order):
        raise TargetError(f"the run's {DEPTH_FILE} ranks only {len(depth.order)} removals and {target} needs "
                          f"{needed}: rerun 'bayesprune depth' with --removals {needed}")
    return choose_blocks(depth.block_scores(num_layers), posterior.sizes, totals, target), depth


def load_fitted(run_dir: str | Path) -> GatePosterior:
    """The posterior a run fitted."""
    run_dir = Path(run_dir)
    read_config(run_dir)
    if not (run_dir / POSTERIOR_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} has no {POSTERIOR_FILE}: its fit has not finished "
                                f"(rerun 'bayesprune fit' with the same settings to resume it)")
    return GatePosterior.load(run_dir / POSTERIOR_FILE)


def load_fitted_model(run_dir: str | Path, device: str | None = None, dtype: str | None = None):
    """The run's network (with jointly trained weights if it had them) and tokenizer."""
    config = read_config(run_dir)
    model, tokenizer = load_model(str(fitted_model_path(run_dir)), device, dtype)
    if config.fit.weights == "joint":
        tensors, _ = load_tensors(Path(run_dir) / CHECKPOINT_FILE)
        with torch.no_grad():
            load_network(model, tensors)
    elif config.fit.weights == "lora":
        tensors, _ = load_tensors(Path(run_dir) / CHECKPOINT_FILE)
        merge_checkpoint_adapters(model, tensors, config.fit.lora_scale)
    return model, tokenizer


def _adapter_deltas(run_dir: Path, config, model_config) -> dict | None:
    """A LoRA run's adapters as weight deltas (``None`` for other runs)."""
    if config.fit.weights != "lora":
        return None
    tensors, _ = load_tensors(run_dir / CHECKPOINT_FILE)
    return adapter_deltas(tensors, model_config, config.fit.lora_scale)


def run_extract(run_dir: str | Path, extraction: ExtractionConfig, out: str | Path, overwrite: bool = False,
                streaming: bool | None = None, device: str | None = None, dtype: str | None = None) -> dict:
    """Extract the sub-network ``extraction`` asks for from a fitted run; nothing is written on error.

    A frozen-weight or adapter fit is cut straight from the original safetensors files
    (``streaming``, the default there), reading only the kept slices (and adding the
    adapters' share of each); a joint fit, whose weights live in the run's checkpoint,
    is cut in memory.
    """
    run_dir = Path(run_dir)
    parsed, form, multiple = extraction.parsed, extraction.form, extraction.multiple
    if parsed is None:
        raise TargetError("extraction needs a target")
    fitted = load_fitted(run_dir)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or remove it")
    config = read_config(run_dir)
    source = fitted_model_path(run_dir)
    if streaming is None:
        streaming = config.fit.weights != "joint"
    if streaming:
        if config.fit.weights == "joint":
            raise ValueError("a joint fit changed the weights: extract it in memory (streaming=False)")
        model_config = load_config(str(source))
        files = CheckpointFiles(source, _adapter_deltas(run_dir, config, model_config))
        totals = files.totals(architecture_for_config(model_config))
        plan, depth = run_plan(run_dir, fitted, totals, parsed, form, multiple)
        record = _record(run_dir, extraction, plan, fitted, depth)
        extract_streaming(files, plan, out, record, overwrite)
    else:
        model, tokenizer = load_fitted_model(run_dir, device, dtype)
        stored = source_dtype(str(source))
        totals = ModelTotals.of(model, stored)
        plan, depth = run_plan(run_dir, fitted, totals, parsed, form, multiple)
        small = extract_model(model, plan).to(stored)
        record = _record(run_dir, extraction, plan, fitted, depth)
        save_extracted(small, tokenizer, out, record, overwrite)
    files_bytes = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {**record, "file_bytes": files_bytes, "path": str(out)}

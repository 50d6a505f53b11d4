"""The extract job (``bayesprune extract``): the sub-network a fitted run cuts for a target, written.

:func:`run_plan` is the one way a run is planned (a block count by the run's ``depth.json``
where there is one, anything else by its posterior); what a run cuts, extraction and drafts
alike, is planned through it.
"""

from __future__ import annotations

from pathlib import Path

from ..core.adapters import adapter_deltas
from ..core.architectures import architecture_for_config
from ..core.config import ExtractionConfig
from ..core.removal import DepthSearch
from ..core.fit import CHECKPOINT_FORMAT
from ..core.io import load_tensors
from ..inputs.pretrained import load_config, source_dtype
from ..core.plan import ExtractionPlan
from ..core.posterior import GatePosterior
from .rundir import (RunDir, fitted_model_path, holding, load_dense_model, load_fitted, load_fitted_model,
                     network_checkpoint, read_config)
from ..core.selection import choose_blocks
from ..core.targets import ModelTotals, Target, TargetError
from ..cut.extraction import CheckpointFiles, extract_model, extract_streaming, save_extracted
from ..cut.reconstruction import reconstruct
from ..cut.recovery import recover_cut
from ..inputs.data import split_corpus, tokenize, windows
from .depth_job import read_depth


def run_plan(run_dir: str | Path, posterior: GatePosterior, totals: ModelTotals, target: Target,
             form: str = "per-layer", multiple: int = 1) -> tuple[ExtractionPlan, DepthSearch | None]:
    """The sub-network a run cuts for ``target``, and the depth ranking that chose it (if one did): a block
    count is cut by the run's ``depth.json`` where ``bayesprune depth`` wrote one, any other target by the
    posterior. Everything that cuts a run (extraction, drafts) plans through here."""
    num_layers = len(posterior.layer_names)
    depth = read_depth(run_dir, num_layers) if target.kind == "layers" else None
    if depth is None:
        return posterior.plan(target, totals, form, multiple), None
    needed = num_layers - int(target.value)
    if needed > len(depth.order):
        raise TargetError(f"the run's {RunDir.DEPTH} ranks only {len(depth.order)} removals and {target} needs "
                          f"{needed}: rerun 'bayesprune depth' with --removals {needed}")
    return choose_blocks(depth.block_scores(num_layers), posterior.sizes, totals, target), depth


def extraction_record(run_dir: Path, extraction: ExtractionConfig, plan, posterior: GatePosterior,
                      depth: DepthSearch | None = None, after: dict | None = None) -> dict:
    """What an extracted model records of how it was cut: the run, the target, the plan, what was removed
    with the posterior's inclusion of it (or the depth ranking that chose it), and what was done to the cut
    model (``after``: its reconstruction and recovery, as :func:`cut_in_memory` reports them)."""
    removed = [i for i in range(plan.num_layers) if i not in plan.kept_layers]
    record = {"source_run": str(run_dir.resolve()), "target": str(extraction.parsed),
              "extraction": extraction.to_dict(), **plan.record(),
              "removed_layer_names": [posterior.layer_names[i] for i in removed], **(after or {})}
    if depth is None:
        keep_p = posterior.block_keep_probability(plan.cost).mean(0)
        return {**record, "removed_inclusion": [keep_p[i].item() for i in removed]}
    steps = depth.steps[:len(removed)]
    return {**record, "depth_ranking": {"file": RunDir.DEPTH, "score": depth.score, "tokens": depth.tokens,
                                        "removed_in_order": [s.removed for s in steps],
                                        "choice_probability": [s.choice_probability for s in steps]}}


def calibration_windows(tokens, seq_len: int, count: int):
    """The first ``count`` tokens (at least one window) of a token stream, as windows of ``seq_len``."""
    return windows(tokens, seq_len)[:max(1, count // seq_len)]


def cut_in_memory(model, plan: ExtractionPlan, extraction: ExtractionConfig, fit_tokens, seq_len: int,
                  stored, dense=None, progress: bool = True) -> tuple:
    """The extracted model cut from ``model`` in memory, in the ``stored`` dtype, refitted and fine-tuned as
    ``extraction`` asks on the run's fit tokens (``fit_tokens()``), a distillation recovery towards ``dense()``
    (the network the run started from); and what was done to it: a dict with the ``reconstruction`` and the
    ``recovery`` records (each absent when not asked for)."""
    small = extract_model(model, plan)
    after = {}
    if extraction.reconstruction != "none":
        windows = calibration_windows(fit_tokens(), seq_len, extraction.calibration_tokens)
        after["reconstruction"] = reconstruct(model, small, plan, windows, extraction.damping, progress=progress,
                                              method=extraction.reconstruction)
    small, recovery = recover_cut(small, fit_tokens() if extraction.recovery_steps != 0 else None, extraction,
                                  seq_len, plan.fraction, dense, progress)
    if recovery is not None:
        after["recovery"] = recovery
    return small.to(stored), after


def _adapter_deltas(run_dir: Path, config, model_config, share: float) -> dict | None:
    """A LoRA run's adapters as weight deltas, ``share`` of their fitted size (``None`` for other runs)."""
    if config.fit.weights != "lora":
        return None
    tensors, _ = load_tensors(network_checkpoint(run_dir), CHECKPOINT_FORMAT)
    return adapter_deltas(tensors, model_config, config.fit.lora_scale * share)


def run_extract(run_dir: str | Path, extraction: ExtractionConfig, out: str | Path, overwrite: bool = False,
                streaming: bool | None = None, device: str | None = None, dtype: str | None = None,
                progress: bool = True) -> dict:
    """Extract the sub-network ``extraction`` asks for from a fitted run; nothing is written on error.

    A frozen-weight or adapter fit is cut straight from the original safetensors files
    (``streaming``, the default there), reading only the kept slices (and adding the
    adapters' share of each); a joint fit, whose weights live in the run's checkpoint,
    and any extraction with a reconstruction or recovery fine-tuning (which run the model) are cut in memory.
    """
    run_dir = Path(run_dir)
    if extraction.parsed is None:
        raise TargetError("extraction needs a target")
    with holding(run_dir, "extract", exclusive=False):
        return _extract_from(run_dir, extraction, out, overwrite, streaming, device, dtype, progress)


def _extract_from(run_dir: Path, extraction: ExtractionConfig, out: str | Path, overwrite: bool,
                  streaming: bool | None, device: str | None, dtype: str | None, progress: bool) -> dict:
    """:func:`run_extract` while the run is held for reading."""
    parsed, form, multiple = extraction.parsed, extraction.form, extraction.multiple
    fitted = load_fitted(run_dir)
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or remove it")
    config = read_config(run_dir)
    source = fitted_model_path(run_dir)
    if streaming is None:
        streaming = config.fit.weights != "joint" and not extraction.in_memory
    if streaming:
        if config.fit.weights == "joint":
            raise ValueError("a joint fit changed the weights: extract it in memory (streaming=False)")
        if extraction.in_memory:
            raise ValueError("reconstruction and recovery fine-tuning work on the model's activations and need it in "
                             "memory: extract in memory (streaming=False), or set reconstruction='none' and "
                             "recovery_steps=0")
        model_config = load_config(str(source))
        files = CheckpointFiles(source, _adapter_deltas(run_dir, config, model_config, extraction.adapter_share))
        totals = files.totals(architecture_for_config(model_config))
        plan, depth = run_plan(run_dir, fitted, totals, parsed, form, multiple)
        record = extraction_record(run_dir, extraction, plan, fitted, depth)
        extract_streaming(files, plan, out, record, overwrite)
    else:
        model, tokenizer = load_fitted_model(run_dir, device, dtype, extraction.adapter_share)
        stored = source_dtype(str(source))
        totals = ModelTotals.of(model, stored)
        plan, depth = run_plan(run_dir, fitted, totals, parsed, form, multiple)

        def fit_tokens():
            return tokenize(tokenizer, split_corpus(config.data)["fit"])

        small, after = cut_in_memory(model, plan, extraction, fit_tokens, config.fit.seq_len, stored,
                                     lambda: load_dense_model(run_dir, device), progress)
        record = extraction_record(run_dir, extraction, plan, fitted, depth, after)
        save_extracted(small, tokenizer, out, record, overwrite)
    files_bytes = sum(p.stat().st_size for p in Path(out).glob("*.safetensors"))
    return {**record, "file_bytes": files_bytes, "path": str(out)}

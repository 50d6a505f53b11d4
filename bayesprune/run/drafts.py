"""A speculative-decoding draft from one fitted posterior: sized by predicted speed-up, written, loaded.

For each candidate size the posterior gives a sub-network. Its acceptance ``α`` is
predicted from the hard-gated network's logits against the target's on the target's own
continuations of validation prompts (no extraction, no drafting); its cost ``c`` per token relative
to the target comes from a short decoding timing of the cut model on this machine;
the target's verification cost ``v(γ)`` from timing a ``γ + 1``-token pass. The
candidate and draft length with the highest ``S(α, γ, c)`` win
(:mod:`bayesprune.speculative.decoding`); ``write_draft`` extracts it, sets ``γ`` on its
``generation_config`` and records the prediction in ``draft.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.config import DECODINGS, DTYPES, FORMS, DraftConfig, ExtractionConfig, GateConfig
from ..inputs.data import load_splits
from ..cut.extraction import extract_model
from ..core.gates import gate
from ..core.io import FileFormat, atomic_directory, read_json, write_json
from ..core.schema import Integer, OneOf
from .extract_job import run_extract, run_plan
from ..inputs.pretrained import compute_dtype, load_config, load_model, source_dtype
from .rundir import fitted_model_path, holding, load_fitted, load_fitted_model, read_config
from ..speculative.decoding import (acceptance, best_gamma, configure_draft, decode_ms, set_draft_length, skip_blocks,
                          trim_vocabulary, vocabulary_for_share)
from ..core.targets import ModelTotals, Target, check_feasible

DRAFT_FILE = "draft.json"  # beside the draft model in the folder 'bayesprune draft' writes
DRAFT_FORMAT = FileFormat("bayesprune-draft", "a bayesprune draft record", legacy=(None,),
                          schema={"draft_dtype": OneOf(DTYPES), "vocabulary?": ([Integer(0)], None),
                                  "form": OneOf(FORMS), "decoding": OneOf(DECODINGS), "candidates": [dict],
                                  "chosen": {"target": str, "gamma": Integer(1)}})


def _vocabulary(tokens: torch.Tensor, share: float | None, tokenizer, vocab_size: int) -> torch.Tensor | None:
    if share is None or share >= 1:
        return None
    specials = tuple(getattr(tokenizer, "all_special_ids", ()) or ())
    return vocabulary_for_share(tokens, share, vocab_size, always=specials)


def prediction(alpha: dict, draft_ms: float, target_ms: float, verify: dict[int, float], decoding: str = "greedy",
               max_gamma: int = 8) -> dict:
    """A draft's predicted acceptance, cost ratio, best ``γ`` and speed-up, from its acceptance
    (:func:`bayesprune.speculative.decoding.acceptance`) and decoding times."""
    cost_ratio = draft_ms / target_ms
    gamma, speedup = best_gamma(alpha[decoding], cost_ratio, verify, max_gamma)
    return {"alpha_greedy": alpha["greedy"], "alpha_sampling": alpha["sampling"], "draft_ms": draft_ms,
            "cost_ratio": cost_ratio, "gamma": gamma, "predicted_speedup": speedup}


def target_continuations(model, tokenizer, tokens: torch.Tensor, count: int, prompt_tokens: int, new_tokens: int,
                         sample: bool = False) -> torch.Tensor:
    """``count`` validation prompts, evenly spaced, each followed by the target's own ``new_tokens``."""
    stride = max((tokens.numel() - prompt_tokens) // count, 1)
    prompts = [tokens[i * stride: i * stride + prompt_tokens] for i in range(count)]
    if any(p.numel() < prompt_tokens for p in prompts):
        raise ValueError(f"the validation split has too few tokens for {count} prompts of {prompt_tokens}")
    torch.manual_seed(0)
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return torch.cat([model.generate(p[None].to(model.device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=sample, pad_token_id=pad) for p in prompts])


@torch.inference_mode()
def rank_drafts(run_dir: str | Path, config: DraftConfig | None = None, device: str | None = None,
                dtype: str | None = None, progress: bool = True, **options) -> dict:
    """Every candidate size with its predicted ``α``, cost ratio ``c``, best ``γ`` and speed-up, best first.

    ``config`` (:class:`~bayesprune.core.config.DraftConfig`; its fields may also be given as keywords)
    names the candidates and how they are judged. ``α`` is read where assisted generation meets it: on
    the target's own continuations of validation prompts, each sub-network's next-token distribution
    against the target's. The target is the run's original model; the sub-networks carry the fit's
    adapters or trained weights, if it had them.
    """
    config = dataclasses.replace(config or DraftConfig(), **options)
    targets, prompt_tokens, max_gamma = config.targets, config.prompt_tokens, config.max_gamma
    run_dir = Path(run_dir)
    fitted = read_config(run_dir)
    posterior = load_fitted(run_dir)
    for target in targets:
        check_feasible(target, load_config(str(fitted_model_path(run_dir))))
    model, tokenizer = load_fitted_model(run_dir, device, dtype)  # the drafts' weights (adapted, if the fit was)
    dense = model if fitted.fit.weights == "frozen" else load_model(str(fitted_model_path(run_dir)), device, dtype)[0]
    splits = load_splits(tokenizer, fitted.data)
    vocab_size = model.config.get_text_config().vocab_size
    vocabulary = _vocabulary(splits["fit"], config.vocab_share, tokenizer, vocab_size)
    totals = ModelTotals.of(model, source_dtype(str(fitted_model_path(run_dir))))
    plans = [run_plan(run_dir, posterior, totals, t, config.form)[0] for t in targets]  # what write_draft extracts

    target_ms = decode_ms(dense, steps=range(1, max_gamma + 2))
    verify = {g: target_ms[g + 1] / target_ms[1] for g in range(1, max_gamma + 1)}
    draft_dtype = compute_dtype(config.draft_dtype) if config.draft_dtype is not None else model.dtype
    draft_ms = []
    for plan in tqdm(plans, desc="timing drafts", disable=not progress):
        small = extract_model(model, plan).to(draft_dtype).eval()
        if vocabulary is not None:
            trim_vocabulary(small, vocabulary)
        draft_ms.append(decode_ms(small)[1])
        del small

    text = target_continuations(dense, tokenizer, splits["validation"], config.num_prompts, prompt_tokens,
                                config.new_tokens, config.decoding == "sampling")
    target_logits = dense(input_ids=text, use_cache=False).logits[:, prompt_tokens - 1:-1]
    gated = gate(model, GateConfig(units=posterior.kinds))
    sums = []
    for plan in plans:
        gates = plan.gates(gated.kinds, gated.values.units)
        # a depth plan keeps whole blocks and folds no amplitudes
        amplitudes = None if plan.cost is None else posterior.amplitudes(plan.cost, point=True)
        with gated.gates_set(gates, amplitudes):
            logits = gated(input_ids=text, use_cache=False).logits[:, prompt_tokens - 1:-1]
        sums.append(acceptance(target_logits, logits, vocabulary))
    gated.remove()

    rows = [{"target": size, "described": str(target), "fraction": plan.fraction, "blocks": len(plan.kept_layers),
             "removed_layers": plan.record()["removed_layers"],
             **prediction(alpha, ms, target_ms[1], verify, config.decoding, max_gamma)}
            for size, target, plan, ms, alpha in zip(config.sizes, targets, plans, draft_ms, sums)]
    rows.sort(key=lambda r: -r["predicted_speedup"])
    return {"run": str(run_dir.resolve()), "form": config.form, "decoding": config.decoding,
            "vocab_share": config.vocab_share,
            "vocabulary": None if vocabulary is None else vocabulary.tolist(),
            "draft_dtype": str(draft_dtype).removeprefix("torch."), "target_ms": target_ms[1],
            "verify_ratio": verify, "acceptance_tokens": sums[0]["tokens"], "candidates": rows}


def write_draft(run_dir: str | Path, out: str | Path, size: str | None = None, progress: bool = True,
                **ranking) -> dict:
    """Extract the draft with the best predicted speed-up (or the one of ``size``) to ``out``, with ``γ`` on its
    ``generation_config`` and the prediction in ``draft.json``; nothing is written on error."""
    from transformers import GenerationConfig

    if size is not None:
        ranking["sizes"] = (size,)
    with holding(run_dir, "draft", exclusive=False), atomic_directory(out) as tmp:  # claimed before the ranking
        ranked = rank_drafts(run_dir, progress=progress, **ranking)
        chosen = ranked["candidates"][0]
        extracted = run_extract(run_dir, ExtractionConfig(target=chosen["target"], form=ranked["form"]), tmp,
                                overwrite=True)
        generation = (GenerationConfig.from_pretrained(tmp) if (tmp / "generation_config.json").is_file()
                      else GenerationConfig.from_model_config(load_config(str(tmp))))
        set_draft_length(generation, chosen["gamma"]).save_pretrained(tmp)
        record = {**ranked, "chosen": chosen, "extraction": {k: extracted[k] for k in ("target", "file_bytes")}}
        write_json(tmp / DRAFT_FILE, DRAFT_FORMAT, record)
    return record


def self_draft(model, posterior, blocks: int, gamma: int = 2):
    """The target itself with all but ``blocks`` blocks skipped, the ones the posterior's depth ranking
    needs least (shared weights; see :func:`bayesprune.speculative.decoding.skip_blocks`)."""
    plan = posterior.plan(Target.parse(f"{int(blocks)}layers"), ModelTotals.of(model))
    return configure_draft(skip_blocks(model, [i for i in range(plan.num_layers) if i not in plan.kept_layers]), gamma)


def read_draft_record(path: str | Path) -> dict:
    record_path = Path(path) / DRAFT_FILE
    if not record_path.is_file():
        raise FileNotFoundError(f"{path} has no {DRAFT_FILE}: it is not a draft 'bayesprune draft' wrote")
    return read_json(record_path, DRAFT_FORMAT)


def load_draft(path: str | Path, device: str | None = None, dtype: str | None = None):
    """A draft ``write_draft`` wrote, ready for ``generate(assistant_model=…)``: in the dtype it was sized for
    (unless ``dtype`` says otherwise), with its trimmed head if it was sized with one, and its ``γ``."""
    record = read_draft_record(path)
    model, _ = load_model(str(path), device, dtype or record["draft_dtype"])
    if record.get("vocabulary") is not None:
        trim_vocabulary(model, torch.tensor(record["vocabulary"], dtype=torch.long))
    return configure_draft(model, record["chosen"]["gamma"])


def format_candidates(ranking: dict) -> str:
    """The candidates as a table, best first."""
    decoding = ranking["decoding"]
    lines = [f"{'target':<34} {'blocks':>6} {'alpha':>6} {'c':>6} {'gamma':>5} {'speed-up':>9}"]
    for row in ranking["candidates"]:
        lines.append(f"{row['described']:<34} {row['blocks']:>6} {row['alpha_' + decoding]:>6.3f} "
                     f"{row['cost_ratio']:>6.3f} {row['gamma']:>5} {row['predicted_speedup']:>8.2f}×")
    return "\n".join(lines)

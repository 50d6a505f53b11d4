"""The common case in one call: gate a model, fit the gate posterior to some text, cut it to a size.

``bp.prune(model, data, "0.5")`` is ``gate`` → ``fit`` → ``extract`` with the library's
defaults (head-group and neuron gates, a cost drawn every step, low-rank adapters: those of
:class:`~bayesprune.GateConfig` and :class:`~bayesprune.FitConfig`). The posterior it returns
answers for every other size without refitting: ``result.posterior.plan(...)`` and
``bp.extract(result.network, result.posterior, other_target)``. The adapters go into the
network at ``adapter_share`` of their fitted size, and the cut is fine-tuned on the same text,
as ``bayesprune extract`` does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .core.architectures import architecture_for_config, max_positions, widths_of
from .core.adapters import merge_checkpoint_adapters
from .core.config import CostConfig, ExtractionConfig, FitConfig, GateConfig, PriorConfig
from .core.kinds import KINDS, check_gateable, layer_kinds, width_kinds
from .inputs.data import Document, tokenize, windows
from .cut.extraction import extract
from .cut.recovery import recover_cut
from .core.fit import Fit, fit
from .core.gates import gate
from .core.plan import ExtractionPlan
from .core.posterior import GatePosterior
from .core.targets import ModelTotals, Target, TargetError, check_feasible
from .evaluation.prediction import SELECTION_WINDOWS, plan_selection


@dataclass
class Pruned:
    """What :func:`prune` gives: the smaller model, the plan that cut it, and what it was cut from."""

    model: torch.nn.Module  # the sub-network, an ordinary transformers model
    plan: ExtractionPlan  # which blocks, heads and neurons it keeps, its size and the cost it was read at
    posterior: GatePosterior  # answers for any other size: posterior.plan(target, totals)
    network: torch.nn.Module  # the full network after the fit (adapters merged at their share, trained weights kept)
    fit: Fit  # the fit itself: history, guide, InferenceData


def check_request(model_config, units, target: Target | None, lengths: dict[str, int], multiple: int = 1) -> None:
    """Refuse, from the model's config alone (no weights), what a fit and cut could not do: gate kinds the
    family lacks, ``lengths`` (by the option that set them) beyond its positions, a block count without
    block-level gates, a size the model cannot meet, a ``multiple`` wider than a block."""
    arch = architecture_for_config(model_config)
    check_gateable(arch, units)
    widths = widths_of(model_config, arch)
    for name in width_kinds(units):
        if KINDS[name].fills and multiple > KINDS[name].count(widths):
            raise ValueError(f"--multiple {multiple} is more than the {KINDS[name].count(widths)} "
                             f"{KINDS[name].plural} a block has")
    limit = max_positions(model_config)
    for option, length in lengths.items():
        if limit is not None and length > limit:
            raise ValueError(f"{option} {length} is longer than the model's {limit} positions")
    if target is not None and target.kind == "layers" and not layer_kinds(units):
        raise TargetError(f"a block count ({target}) needs block, attn or mlp gates; this run gates {list(units)}")
    if target is not None:
        check_feasible(target, model_config)


def fitting_windows(data, seq_len: int, tokenizer=None) -> torch.Tensor:
    """Token windows ``(n, seq_len)`` from windows, one token stream, or text (a string or a list of strings,
    each a document, tokenised with ``tokenizer``)."""
    if isinstance(data, str):
        data = [data]
    if isinstance(data, (list, tuple)):
        if tokenizer is None:
            raise ValueError("text needs the model's tokenizer: prune(model, text, target, tokenizer=tokenizer)")
        if not all(isinstance(text, str) for text in data):
            raise ValueError("data must be token ids, a string, or a list of strings")
        data = tokenize(tokenizer, [Document(f"document {i}", text) for i, text in enumerate(data)])
    if not isinstance(data, torch.Tensor) or data.dtype not in (torch.int32, torch.int64):
        raise ValueError("data must be token ids (a 1-D stream or 2-D windows), a string, or a list of strings")
    if data.dim() == 1:
        return windows(data, seq_len)
    if data.dim() == 2:
        return data
    raise ValueError(f"token ids must be a 1-D stream or 2-D windows, not shape {tuple(data.shape)}")


def prune(model: torch.nn.Module, data, target: Target | str | float = "0.75", *, tokenizer=None,
          units: tuple[str, ...] | list[str] | None = None, config: FitConfig | None = None,
          prior: PriorConfig | None = None, cost: CostConfig | None = None, form: str = "per-layer",
          multiple: int = 1, adapter_share: float = ExtractionConfig.adapter_share,
          recovery_steps: int | None = ExtractionConfig.recovery_steps,
          recovery_lr: float = ExtractionConfig.recovery_lr,
          recovery_likelihood: str = ExtractionConfig.recovery_likelihood, progress: bool = True) -> Pruned:
    """Fit the gate posterior of ``model`` to ``data`` and cut the sub-network of size ``target`` from it.

    ``data`` is token windows, a token stream, or text with ``tokenizer``; ``target`` any size
    :class:`~bayesprune.core.targets.Target` reads (``0.5``, ``"12layers"``, ``"80M"``, ``"300MB"``,
    ``"40%flops"``). The target is checked against the model before anything is fitted.
    ``model`` is gated in place and handed back as ``result.network``, with ``adapter_share`` of an adapter
    fit's weight change; the cut is then fine-tuned for ``recovery_steps`` (default: by the cut) on ``data``
    (:class:`~bayesprune.ExtractionConfig`), towards a frozen copy of ``model`` as it came in when
    ``recovery_likelihood`` is ``"distillation"`` (kept in memory for that).
    """
    extraction = ExtractionConfig(target=None, form=form, multiple=multiple, adapter_share=adapter_share,
                                  recovery_steps=recovery_steps, recovery_lr=recovery_lr,
                                  recovery_likelihood=recovery_likelihood)  # refused before a fit
    gates = GateConfig(units=tuple(units)) if units is not None else GateConfig()
    config = config or FitConfig()
    parsed = target if isinstance(target, Target) else Target.parse(target)
    sequences = fitting_windows(data, config.seq_len, tokenizer)
    check_request(model.config, gates.units, parsed, {"the windows' length": sequences.shape[1]}, multiple)
    select = plan_selection(parsed, ModelTotals.of(model), sequences[:SELECTION_WINDOWS], form, multiple,
                            adapter_share) \
        if config.chains > 1 else None  # several chains: keep the one whose cut at the target reads best
    dense = copy.deepcopy(model) if recovery_steps != 0 and recovery_likelihood == "distillation" else None
    gated = gate(model, gates)
    result = fit(gated, sequences, config, prior, cost, progress=progress, select=select)
    posterior = result.posterior()
    network = gated.remove()
    if result.adapters and adapter_share != 1:  # the merged adapters, taken back to their share
        merge_checkpoint_adapters(network, result.adapters, config.lora_scale * (adapter_share - 1))
    small, plan = extract(network, posterior, parsed, form, multiple)
    small, _ = recover_cut(small, sequences.flatten(), extraction, config.seq_len, plan.fraction, lambda: dense,
                           progress)
    return Pruned(small, plan, posterior, network, result)


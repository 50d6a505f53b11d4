"""Refit what an extraction keeps, so that each block's output projections reproduce the dense ones.

Removing heads or FFN neurons deletes input channels of a branch's output projection (``o_proj``,
``down_proj``, GPT-2's ``c_proj``). Its kept columns are refitted by least squares, block after block
as in SparseGPT: the extracted network's own inputs to the projection ``x̃`` (after every earlier refit
and removal) should give the dense projection's output on the dense network's inputs ``x``::

    W_K = (W · A + λ·W[:, K]) · (B + λ·I)⁻¹,    A = Σ x x̃ᵀ,  B = Σ x̃ x̃ᵀ,  λ = damping · mean(diag B)

over calibration text: least squares pulled towards the columns as they were (``λ``), so that directions
the calibration text barely excites keep their original weights. Where nothing before the block changed,
``x̃ = x_K`` and this is the structured optimal-brain-surgeon update of ZipLM and SlimGPT (with their
damped Hessian) for the final kept set. The per-unit amplitudes a fit folds into those columns are
superseded; a branch's own amplitude is kept.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..core.architectures import architecture_for_config, decoder_layers, widths_of
from ..core.plan import ExtractionPlan
from ..inputs.data import batches
from .extraction import recipes


def _projections(model: torch.nn.Module, plan: ExtractionPlan) -> dict[int, list[tuple[str, tuple[int, ...], float]]]:
    """Per dense block: (projection module within the block, its kept input columns, the branch factor folded into
    it) for every output projection the plan narrows."""
    arch = architecture_for_config(model.config)
    widths = widths_of(model.config, arch)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    prefix = arch.layers + "."
    found: dict[int, list] = {}
    for recipe in recipes(plan, arch, widths, shapes).values():
        module, _, leaf = recipe.source.rpartition(".")
        if not module.startswith(prefix) or leaf != "weight" or recipe.dim is None:
            continue
        index, inner = module[len(prefix):].split(".", 1)
        if inner in arch.outputs:
            found.setdefault(int(index), []).append((inner, recipe.index, recipe.factor))
    return {i: sorted(p, key=lambda item: arch.outputs.index(item[0])) for i, p in found.items()}


class _LayerArguments:
    """While open over a model's forward passes: per decoder block and batch, the arguments the block receives
    besides its hidden states (attention masks, position embeddings), and the hidden states entering block 0."""

    def __init__(self, model: torch.nn.Module):
        self.first: list[torch.Tensor] = []
        self.arguments: list[list[tuple[tuple, dict]]] = [[] for _ in decoder_layers(model)]
        self.handles = [block.register_forward_pre_hook(self._recorder(i), with_kwargs=True)
                        for i, block in enumerate(decoder_layers(model))]

    def _recorder(self, index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                self.first.append(hidden)
            self.arguments[index].append((tuple(args[1:]), kwargs))
        return hook

    def __enter__(self) -> "_LayerArguments":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _inputs_of(module: torch.nn.Module):
    """Every input ``module`` sees while open (as float32 rows), in a list."""
    seen: list[torch.Tensor] = []

    def hook(_module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]).float())

    handle = module.register_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _run(block: torch.nn.Module, hidden: torch.Tensor, arguments: tuple[tuple, dict]) -> torch.Tensor:
    out = block(hidden, *arguments[0], **arguments[1])
    return out[0] if isinstance(out, tuple) else out


def least_squares_columns(weight: torch.Tensor, kept: tuple[int, ...], cross: torch.Tensor, moment: torch.Tensor,
                          damping: float) -> torch.Tensor:
    """The columns ``kept`` of ``weight`` ``(out, in)`` refitted to reproduce its outputs:
    ``(W · cross + λ·W[:, K]) · (moment + λ·I)⁻¹`` with ``cross = Σ x x̃ᵀ`` (dense inputs by kept inputs),
    ``moment = Σ x̃ x̃ᵀ`` and ``λ`` = ``damping`` of ``moment``'s mean diagonal."""
    w, b = weight.double(), moment.double().clone()
    ridge = damping * b.diagonal().mean()
    if ridge == 0:
        b.diagonal()[b.diagonal() == 0] = 1.0  # a kept input that never fires has nothing to fit
    b.diagonal().add_(ridge)
    rhs = w @ cross.double() + ridge * w[:, list(kept)]
    return torch.linalg.solve(b, rhs.T).T.to(weight.dtype)


def output_error(weight: torch.Tensor, columns: torch.Tensor, wanted: float, cross: torch.Tensor,
                 moment: torch.Tensor) -> float:
    """``‖X Wᵀ − X̃ W_Kᵀ‖² / ‖X Wᵀ‖²`` from the moments (``wanted = ‖X Wᵀ‖²``)."""
    w, c = weight.double(), columns.double()
    residual = wanted - 2 * torch.trace(w @ cross.double() @ c.T) + torch.trace(c @ moment.double() @ c.T)
    return float(residual / wanted)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, small: torch.nn.Module, plan: ExtractionPlan, windows: torch.Tensor,
                damping: float = 1.0, batch_size: int = 4, progress: bool = True) -> dict:
    """Refit ``small``'s narrowed output projections in place (``small`` is ``extract_model(model, plan)``), block
    after block, on ``windows`` of calibration text; returns the mean relative output error of the projections
    as cut and as refitted (on the extracted network's own inputs)."""
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    narrowed = _projections(model, plan)
    if not narrowed:
        return {"projections": 0}
    transposed = architecture_for_config(model.config).transposed
    device = next(model.parameters()).device
    with _LayerArguments(model) as captured:
        for batch in batches(windows, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    dense_hidden, small_hidden = list(captured.first), list(captured.first)
    small_of = {layer.index: j for j, layer in enumerate(plan.layers)}
    dense_blocks, small_blocks = decoder_layers(model), decoder_layers(small)
    before, after = [], []
    for i in tqdm(range(len(dense_blocks)), desc="reconstruction", disable=not progress):
        block, arguments = dense_blocks[i], captured.arguments[i]
        kept_block = small_blocks[small_of[i]] if i in small_of else None
        projections = narrowed.get(i, [])
        with contextlib.ExitStack() as stack:  # the dense block once: its projections' inputs and its outputs
            dense_inputs = {inner: stack.enter_context(_inputs_of(block.get_submodule(inner)))
                            for inner, _, _ in projections}
            dense_hidden = [_run(block, h, args) for h, args in zip(dense_hidden, arguments)]
        for inner, kept, factor in projections:  # in the block's order: attention's, then the MLP's
            dense_module, small_module = block.get_submodule(inner), kept_block.get_submodule(inner)
            weight = dense_module.weight.float()
            weight = weight.T if transposed else weight
            wanted, cross, moment = 0.0, 0, 0
            with _inputs_of(small_module) as seen:
                for h_kept, args in zip(small_hidden, arguments):
                    _run(kept_block, h_kept, args)
            for x, x_kept in zip(dense_inputs.pop(inner), seen):
                wanted += float((x @ weight.T).double().square().sum())
                cross = cross + x.T @ x_kept
                moment = moment + x_kept.T @ x_kept
            stored = small_module.weight
            cut = (stored.T if transposed else stored).float() / factor
            columns = least_squares_columns(weight, kept, cross, moment, damping)
            before.append(output_error(weight, cut, wanted, cross, moment))
            after.append(output_error(weight, columns, wanted, cross, moment))
            refitted = columns * factor
            stored.copy_((refitted.T if transposed else refitted).to(stored.dtype))
        if kept_block is not None:
            small_hidden = [_run(kept_block, h, args) for h, args in zip(small_hidden, arguments)]
    return {"projections": len(before), "tokens": int(windows.numel()), "damping": damping,
            "relative_error_cut": sum(before) / len(before), "relative_error_refitted": sum(after) / len(after)}

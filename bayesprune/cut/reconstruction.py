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

Bias compensation (FLAP) adds to each narrowed projection the mean of what it now misses,
``b = W·E[x] − W_K·E[x̃]`` over the same calibration text, after the least-squares refit or alone. Where the
projection has no bias, the config switch that gives it one is turned on (``attention_bias``, ``mlp_bias``) and
every other bias that switch adds is zero, so the checkpoint loads as plain ``transformers`` builds it.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from tqdm.auto import tqdm

from ..core.architectures import architecture_for_config, decoder_layers, widths_of
from ..core.config import RECONSTRUCTIONS
from ..core.plan import ExtractionPlan
from ..inputs.data import batches
from ..inputs.pruned import global_access
from .extraction import recipes


BIAS_SWITCHES = ("attention_bias", "mlp_bias")  # config flags that give a block's projections biases


def _biases(block: torch.nn.Module) -> set[str]:
    return {name for name, module in block.named_modules() if getattr(module, "bias", None) is not None}


def _module(block: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """``block``'s submodule ``name``, or ``None`` where the block has none (a removed branch)."""
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def give_output_biases(small: torch.nn.Module, inners: set[str]) -> None:
    """Give ``small``'s output projections ``inners`` (names within a block) a bias in every block, in place: turn
    on the config switches that add one, every bias they add starting at zero. Raises if no switch adds one."""
    blocks = decoder_layers(small)
    missing = {name for block in blocks for name in inners
               if _module(block, name) is not None and _module(block, name).bias is None}
    if not missing:
        return
    config, layer_type = small.config, type(blocks[0])
    with global_access(config):
        plain = _biases(layer_type(config, layer_idx=0))
    switches, added = [], set()
    for switch in BIAS_SWITCHES:
        if getattr(config, switch, None) is False and not missing <= added:
            trial = copy.deepcopy(config)
            setattr(trial, switch, True)
            with global_access(trial):
                gained = _biases(layer_type(trial, layer_idx=0)) - plain
            if gained & missing:
                switches.append(switch)
                added |= gained
    if not missing <= added:
        raise ValueError(f"bias compensation needs a bias on {sorted(missing - added)}, and no config switch of "
                         f"{config.model_type} adds one; use reconstruction 'least-squares' alone")
    for switch in switches:
        setattr(config, switch, True)
    for block in blocks:
        for name in added:
            module = _module(block, name)
            if isinstance(module, torch.nn.Linear) and module.bias is None:
                module.bias = torch.nn.Parameter(module.weight.new_zeros(module.out_features))


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
                damping: float = 1.0, batch_size: int = 4, progress: bool = True,
                method: str = "least-squares") -> dict:
    """Refit ``small``'s narrowed output projections in place (``small`` is ``extract_model(model, plan)``), block
    after block, on ``windows`` of calibration text: ``method`` ``least-squares`` refits their kept columns,
    ``bias`` adds the mean of what they miss, ``least-squares+bias`` does both. Returns the mean relative output
    error of the projections as cut and as refitted (on the extracted network's own inputs)."""
    if method not in RECONSTRUCTIONS[1:]:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS[1:]}, not {method!r}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    narrowed = _projections(model, plan)
    if not narrowed:
        return {"projections": 0}
    refit_columns, compensate = method != "bias", method.endswith("bias")
    if compensate:
        give_output_biases(small, {inner for projections in narrowed.values() for inner, _, _ in projections})
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
            wanted, cross, moment, total, total_kept, rows = 0.0, 0, 0, 0, 0, 0
            with _inputs_of(small_module) as seen:
                for h_kept, args in zip(small_hidden, arguments):
                    _run(kept_block, h_kept, args)
            for x, x_kept in zip(dense_inputs.pop(inner), seen):
                wanted += float((x @ weight.T).double().square().sum())
                cross = cross + x.T @ x_kept
                moment = moment + x_kept.T @ x_kept
                total, total_kept, rows = total + x.double().sum(0), total_kept + x_kept.double().sum(0), rows + len(x)
            stored = small_module.weight
            cut = (stored.T if transposed else stored).float() / factor
            columns = least_squares_columns(weight, kept, cross, moment, damping) if refit_columns else cut
            before.append(output_error(weight, cut, wanted, cross, moment))
            after.append(output_error(weight, columns, wanted, cross, moment))
            if refit_columns:
                refitted = columns * factor
                stored.copy_((refitted.T if transposed else refitted).to(stored.dtype))
            if compensate:  # the mean residual: removing it lowers the summed squared error by rows·‖mean‖²
                missed = (weight.double() @ total - columns.double() @ total_kept) / rows
                after[-1] -= float(rows * missed.square().sum() / wanted)
                small_module.bias.add_((missed * factor).to(small_module.bias.dtype))
        if kept_block is not None:
            small_hidden = [_run(kept_block, h, args) for h, args in zip(small_hidden, arguments)]
    return {"projections": len(before), "tokens": int(windows.numel()), "method": method, "damping": damping,
            "relative_error_cut": sum(before) / len(before), "relative_error_refitted": sum(after) / len(after)}

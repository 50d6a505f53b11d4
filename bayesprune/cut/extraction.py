"""Cutting weights to an extraction plan: in memory, or streamed from safetensors files.

Both paths use the same recipes (which tensor, which dimension, which positions),
so a checkpoint written without loading the original model is the one the
in-memory path builds. The streaming writer reads only the kept slices
(``safe_open(...).get_slice``) and writes one tensor at a time: its peak memory is
about the largest single tensor, not the model.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.architectures import Architecture, Widths, architecture_for_config, widths_of
from ..core.io import SAFETENSORS_DTYPES, FileFormat, atomic_directory, write_json
from ..core.kinds import BRANCHES, KINDS, branch_kind
from ..inputs.pruned import build_model, global_access
from ..core.plan import ExtractionPlan
from ..core.targets import ModelTotals, TargetError

EXTRACTION_FILE = "bayesprune_extraction.json"  # the extraction record, beside the weights
EXTRACTION_FORMAT = FileFormat("bayesprune-extraction", "a bayesprune extraction record")
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Recipe:
    """Take ``source``, keep positions ``index`` along ``dim`` (``None``: all of it), then scale.

    Scaling folds amplitudes in: the kept tensor is multiplied by ``factor`` and, along
    ``scale_dim``, by ``scale`` (one value per kept position). A norm weight that acts
    as ``offset + weight`` (Gemma) becomes ``(offset + weight)·factor − offset``.
    """

    source: str
    shape: tuple[int, ...]
    dim: int | None = None
    index: tuple[int, ...] | None = None
    scale: tuple[float, ...] | None = None
    scale_dim: int = 0
    factor: float = 1.0
    offset: float = 0.0

    def finish(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (already cut) with the scaling applied, at its own dtype."""
        if self.scale is None and self.factor == 1.0:
            return tensor
        scaled = (tensor.double() + self.offset) * self.factor - self.offset
        if self.scale is not None:
            view = [1] * tensor.dim()
            view[self.scale_dim] = -1
            scaled = scaled * torch.tensor(self.scale, dtype=torch.float64).view(view)
        return scaled.to(tensor.dtype)

    def runs(self) -> list[tuple[int, int]]:
        """``index`` as half-open runs of consecutive positions."""
        runs = []
        for i in self.index:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        return runs


def _features(units: list[int], per_unit: int) -> tuple[int, ...]:
    return tuple(u * per_unit + j for u in units for j in range(per_unit))


def recipes(plan: ExtractionPlan, arch: Architecture, widths: Widths,
            shapes: dict[str, tuple[int, ...]]) -> dict[str, Recipe]:
    """New tensor name → recipe, for every tensor of the original checkpoint that stays."""
    prefix = arch.layers + "."
    kept = {layer.index: (new, layer) for new, layer in enumerate(plan.layers)}
    found = {int(name[len(prefix):].split(".", 1)[0]) for name in shapes if name.startswith(prefix)}
    if found != set(range(plan.num_layers)):
        raise TargetError(f"the checkpoint has blocks {sorted(found)[:5]}… under {arch.layers!r}, "
                          f"the plan expects {plan.num_layers}")
    slices = {s.module: s for s in arch.width + arch.head_norms}
    result = {}
    for name, shape in shapes.items():
        if not name.startswith(prefix):
            result[name] = Recipe(name, tuple(shape))
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) not in kept:
            continue
        new, layer = kept[int(index)]
        branch = rest.split(".", 1)[0]
        if (branch == arch.attention and not layer.attn) or (branch == arch.mlp and not layer.mlp):
            continue
        module, _, leaf = rest.rpartition(".")
        piece = slices.get(module)
        kind = None if piece is None else _cutting(layer, piece.kind)
        new_name = f"{prefix}{new}.{rest}"
        dim, positions, cut = None, None, tuple(shape)
        if kind is not None and not (leaf == "bias" and piece.axis == "in"):
            dim = 0 if len(shape) == 1 or (piece.axis == "out") != arch.transposed else 1
            positions = _features(layer.kept(kind), KINDS[kind].features(widths, piece))
            cut = tuple(len(positions) if d == dim else size for d, size in enumerate(shape))
        result[new_name] = Recipe(name, cut, dim, positions, **_folding(module, leaf, layer, arch, widths))
    return result


def _cutting(layer, label: str) -> str | None:
    """The width kind whose kept units cut the weights of a slice ``label`` in this layer (``None``: all kept)."""
    return next((k for k, units in layer.units.items() if units is not None and KINDS[k].slices == label), None)


def _folding(module: str, leaf: str, layer, arch: Architecture, widths: Widths) -> dict:
    """How a tensor is scaled to fold the layer's amplitudes in: per-unit columns of the output
    projections, and the branch amplitude where it acts (the output projection or the post-norm)."""
    folding = {}
    for branch, output in zip(BRANCHES, arch.outputs):
        factor = getattr(layer, f"{branch}_amplitude")
        if module == arch.amplitude_fold(branch) and factor != 1.0:
            folding["factor"] = factor
            if arch.post_norms:
                folding["offset"] = arch.norm_offset
        kind = branch_kind(layer.amplitudes, branch)
        if module == output and leaf == "weight" and kind is not None:
            per_unit = KINDS[kind].features(widths, KINDS[kind].site(arch))
            folding |= {"scale": tuple(a for a in layer.amplitudes[kind] for _ in range(per_unit)),
                        "scale_dim": 0 if arch.transposed else 1}
    return folding


def depth_config(config, keep: list[int], num_layers: int, arch: Architecture):
    """A copy of ``config`` for the blocks ``keep`` only: per-block lists sliced, the block count set."""
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and keep != list(range(num_layers)):
        raise TargetError("this GPT-2 config scales attention by layer index; removing blocks would change it")
    config = copy.deepcopy(config)
    for name in arch.per_layer_fields:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == num_layers:
            setattr(config, name, [values[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return config


def extracted_config(config, plan: ExtractionPlan, arch: Architecture, widths: Widths):
    """The config of the extracted model: uniform widths, or ``per_layer_config`` overrides."""
    config = depth_config(config, plan.kept_layers, plan.num_layers, arch)
    if arch.width_slices("head"):
        config.head_dim = widths.head_dim
    setattr(config, arch.neuron_field, widths.neurons)

    def overrides(layer) -> dict:
        values = {}
        for name, units in layer.units.items():
            kind = KINDS[name]
            if units is not None and getattr(layer, kind.branch) and len(units) != kind.count(widths):
                values |= kind.config_fields(len(units), widths, arch)
        skip = [name for name, on in ((arch.attention, layer.attn), (arch.mlp, layer.mlp)) if not on]
        return values | ({"skip": skip} if skip else {})

    per_layer = {i: overrides(layer) for i, layer in enumerate(plan.layers)}
    if plan.form == "uniform":
        distinct = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
        if len(distinct) > 1 or "skip" in per_layer[0]:
            raise TargetError("a uniform plan must give every kept block the same widths and keep both branches")
        for key, value in per_layer[0].items():
            setattr(config, key, value)
        heads = getattr(config, "num_attention_heads", None)
        if heads and config.hidden_size % heads:
            raise TargetError(f"transformers requires hidden_size ({config.hidden_size}) to be a multiple of "
                              f"num_attention_heads; {heads} heads per block cannot be saved in the uniform form "
                              f"(use the per-layer form)")
    elif any(per_layer.values()):
        config.per_layer_config = {i: v for i, v in per_layer.items() if v}
    return config


@contextlib.contextmanager
def _saving(config, directory: Path):
    """Let ``transformers`` validate and save a per-layer config (its checks read global values).

    The switch that allows it is taken out of the saved ``config.json`` again, so
    that plain ``transformers`` keeps refusing to build a per-layer model wrongly.
    """
    with global_access(config):
        yield
    path = directory / "config.json"
    values = json.loads(path.read_text())
    values.pop("allow_global_per_layer_attribute_access", None)
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def extract_model(model: torch.nn.Module, plan: ExtractionPlan) -> torch.nn.Module:
    """The extracted model, built in memory from ``model`` (which is left untouched)."""
    arch = architecture_for_config(model.config)
    widths = widths_of(model.config, arch)
    state = model.state_dict()
    cut = {}
    for name, recipe in recipes(plan, arch, widths, {n: tuple(t.shape) for n, t in state.items()}).items():
        tensor = state[recipe.source]
        if recipe.dim is not None:
            tensor = tensor.index_select(recipe.dim, torch.tensor(recipe.index))
        cut[name] = recipe.finish(tensor.detach()).clone()
    return build_model(extracted_config(model.config, plan, arch, widths), cut)


def save_extracted(model: torch.nn.Module, tokenizer, out: str | Path, record: dict,
                   overwrite: bool = False) -> Path:
    """Save model, tokenizer and an extraction record; the folder appears only when complete."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with _saving(model.config, tmp):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / EXTRACTION_FILE, EXTRACTION_FORMAT, record)
    return Path(out)


class CheckpointFiles:
    """The tensors of a Hugging Face safetensors folder: names, shapes, dtypes, slices; with ``deltas``
    (weight name → tensor of its shape, e.g. merged adapters), each read slice has its delta's slice added."""

    def __init__(self, directory: str | Path, deltas: dict[str, torch.Tensor] | None = None):
        self.directory = Path(directory)
        self.deltas = deltas or {}
        self.files = sorted(self.directory.glob("*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"{directory} has no .safetensors weights to extract from")
        self.where, self.shapes, self.dtypes = {}, {}, {}
        for path in self.files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    self.where[name] = path
                    self.shapes[name] = tuple(piece.get_shape())
                    self.dtypes[name] = piece.get_dtype()

    def totals(self, arch: Architecture) -> ModelTotals:
        numel = {n: torch.Size(s).numel() for n, s in self.shapes.items()}
        outside = sum(v for n, v in numel.items() if not n.startswith(arch.layers + "."))
        size = sum(v * SAFETENSORS_DTYPES[self.dtypes[n]].itemsize for n, v in numel.items())
        return ModelTotals(outside, size / sum(numel.values()))

    def read(self, recipe: Recipe) -> torch.Tensor:
        """The kept part of one tensor; the file is mapped only while it is read."""
        with safe_open(self.where[recipe.source], framework="pt") as f:
            piece = f.get_slice(recipe.source)
            if recipe.dim is None:
                kept = piece[:]
            else:
                lead = (slice(None),) * recipe.dim
                kept = torch.cat([piece[lead + (slice(a, b),)] for a, b in recipe.runs()], dim=recipe.dim)
        delta = self.deltas.get(recipe.source)
        if delta is not None:
            if recipe.dim is not None:
                delta = delta.index_select(recipe.dim, torch.tensor(recipe.index))
            kept = (kept.double() + delta).to(kept.dtype)
        return recipe.finish(kept)


def _write_streaming(files: CheckpointFiles, plan_recipes: dict[str, Recipe], path: Path) -> None:
    """Write a safetensors file tensor by tensor, each read from its kept slices."""
    header, offset = {}, 0
    names = sorted(plan_recipes)
    for name in names:
        recipe = plan_recipes[name]
        dtype = files.dtypes[recipe.source]
        nbytes = torch.Size(recipe.shape).numel() * SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(recipe.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in names:
            tensor = files.read(plan_recipes[name]).contiguous()
            if tuple(tensor.shape) != plan_recipes[name].shape:
                raise ValueError(f"{name}: read {tuple(tensor.shape)}, planned {plan_recipes[name].shape}")
            if tensor.numel():
                out.write(tensor.reshape(-1).view(torch.uint8).numpy())  # no copy
            del tensor


def extract_streaming(source: str | Path | CheckpointFiles, plan: ExtractionPlan, out: str | Path, record: dict,
                      overwrite: bool = False) -> Path:
    """Write the extracted checkpoint from the original's files (a folder, or its :class:`CheckpointFiles`),
    never loading the whole model.

    Config, generation config and tokenizer files are copied from the source folder.
    """
    from transformers import AutoConfig

    files = source if isinstance(source, CheckpointFiles) else CheckpointFiles(source)
    source = files.directory
    config = AutoConfig.from_pretrained(source)
    arch = architecture_for_config(config)
    widths = widths_of(config, arch)
    plan_recipes = recipes(plan, arch, widths, files.shapes)
    new_config = extracted_config(config, plan, arch, widths)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _write_streaming(files, plan_recipes, tmp / WEIGHTS_FILE)
        with _saving(new_config, tmp):
            new_config.save_pretrained(tmp)
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in (
                    "config.json", "model.safetensors.index.json", EXTRACTION_FILE):
                shutil.copy2(item, tmp / item.name)
        write_json(tmp / EXTRACTION_FILE, EXTRACTION_FORMAT, record)
    return Path(out)


def extract(model: torch.nn.Module, posterior, target, form: str = "per-layer",
            multiple: int = 1) -> tuple[torch.nn.Module, ExtractionPlan]:
    """Choose the sub-network for ``target`` from a :class:`~bayesprune.GatePosterior` and cut it from ``model``
    in memory."""
    plan = posterior.plan(target, ModelTotals.of(model), form, multiple)
    return extract_model(model, plan), plan

"""Where each model family keeps its decoder blocks and their widths: one table row per family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class WidthSlice:
    """One weight (and bias) of a block that is cut when heads or neurons go.

    ``module`` is a path inside the block; ``kind`` is ``head`` (a key/value head
    with every query head that reads it) or ``neuron`` (one FFN hidden unit);
    ``axis`` says whether the unit indexes the module's output features (``out``;
    its bias is cut too) or its input features (``in``: this is where the gate
    sits); ``per_unit`` is the number of features per unit: ``query`` (query
    heads per group × head_dim), ``kv`` (head_dim) or ``one``.
    """

    module: str
    kind: str
    axis: str
    per_unit: str


_LLAMA_HEADS = (
    WidthSlice("self_attn.q_proj", "head", "out", "query"),
    WidthSlice("self_attn.k_proj", "head", "out", "kv"),
    WidthSlice("self_attn.v_proj", "head", "out", "kv"),
    WidthSlice("self_attn.o_proj", "head", "in", "query"),
)
_GATED_MLP = (
    WidthSlice("mlp.gate_proj", "neuron", "out", "one"),
    WidthSlice("mlp.up_proj", "neuron", "out", "one"),
    WidthSlice("mlp.down_proj", "neuron", "in", "one"),
)
# OLMo-2 normalises q and k over all heads at once: these norms are cut with the
# heads, and while gated they average only over the heads that are on.
_OLMO2_HEAD_NORMS = (
    WidthSlice("self_attn.q_norm", "head", "out", "query"),
    WidthSlice("self_attn.k_norm", "head", "out", "kv"),
)


@dataclass(frozen=True)
class Architecture:
    """How to find the prunable structure of one family of causal LMs.

    ``layers`` is the dotted path from the ``*ForCausalLM`` module to the
    ``ModuleList`` of decoder blocks; ``attention`` and ``mlp`` are attributes of a
    block; ``outputs`` are the attention and MLP output projections (where
    amplitudes are folded). ``per_layer_fields`` are config lists with one entry per block, sliced
    when blocks are removed. ``width`` lists the weights cut by head and neuron
    gates (no ``head`` entries: heads cannot be gated), ``head_norms`` the norms
    among them that mix heads, ``neuron_field`` the config field holding the FFN
    width, and ``transposed`` marks ``Conv1D`` weights stored ``(in, out)``.
    ``post_norms`` are the norms a family applies to each branch's output before the
    residual add (OLMo-2, Gemma 2 and 3): a gate before such a norm would be normalised
    away, so branch gates and their amplitudes act on the norm's output instead;
    ``norm_offset`` is what a family's norms add to their weight (Gemma: 1).
    """

    family: str
    layers: str
    attention: str
    mlp: str
    per_layer_fields: tuple[str, ...] = ("layer_types",)
    width: tuple[WidthSlice, ...] = _LLAMA_HEADS + _GATED_MLP
    head_norms: tuple[WidthSlice, ...] = ()
    neuron_field: str = "intermediate_size"
    transposed: bool = False
    outputs: tuple[str, str] = ("self_attn.o_proj", "mlp.down_proj")
    post_norms: tuple[str, str] | None = None
    norm_offset: float = 0.0  # Gemma's norms scale by (offset + weight)

    def branch_output(self, kind: str) -> str:
        """The module whose output an ``attn`` / ``mlp`` gate multiplies: the branch, or its post-norm."""
        index = ("attn", "mlp").index(kind)
        return self.post_norms[index] if self.post_norms else (self.attention, self.mlp)[index]

    def amplitude_fold(self, kind: str) -> str:
        """The module whose weight (and bias) an ``attn`` / ``mlp`` amplitude is folded into."""
        index = ("attn", "mlp").index(kind)
        return (self.post_norms or self.outputs)[index]

    def width_slices(self, kind: str) -> tuple[WidthSlice, ...]:
        return tuple(s for s in self.width + self.head_norms if s.kind == kind)

    def gate_site(self, kind: str) -> WidthSlice | None:
        """The module whose input the ``kind`` gates multiply (``None``: not gateable)."""
        return next((s for s in self.width if s.kind == kind and s.axis == "in"), None)


_LLAMA_LIKE = dict(layers="model.layers", attention="self_attn", mlp="mlp")
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")

ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", **_LLAMA_LIKE),
    "mistral": Architecture("mistral", **_LLAMA_LIKE),
    "qwen2": Architecture("qwen2", **_LLAMA_LIKE),
    "qwen3": Architecture("qwen3", **_LLAMA_LIKE),
    "olmo2": Architecture("olmo2", **_LLAMA_LIKE, head_norms=_OLMO2_HEAD_NORMS,
                          post_norms=_POST_NORMS),
    "gemma2": Architecture("gemma2", **_LLAMA_LIKE, post_norms=_POST_NORMS, norm_offset=1.0),
    "gemma3_text": Architecture("gemma3_text", **_LLAMA_LIKE, post_norms=_POST_NORMS, norm_offset=1.0),
    # GPT-2 attention derives head_dim from n_embd / n_head, so it cannot hold fewer heads.
    "gpt2": Architecture("gpt2", layers="transformer.h", attention="attn", mlp="mlp",
                         width=(WidthSlice("mlp.c_fc", "neuron", "out", "one"),
                                WidthSlice("mlp.c_proj", "neuron", "in", "one")),
                         neuron_field="n_inner", transposed=True, outputs=("attn.c_proj", "mlp.c_proj")),
}


class UnsupportedArchitectureError(ValueError):
    """The model's family is not in :data:`ARCHITECTURES` or does not match its row."""


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for name in dotted.split("."):
        module = getattr(module, name)
    return module


def architecture_of(model: nn.Module) -> Architecture:
    """The table row for ``model``; a clear error names what is missing."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{name} (model_type={model_type!r}) is not supported: bayesprune.core.architectures."
            f"ARCHITECTURES has no row saying where its decoder blocks, attention and MLP are. "
            f"Supported model types: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    try:
        layers = _resolve(model, arch.layers)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"{name} has no module at {arch.layers!r}, where the {arch.family} row expects the "
            f"decoder blocks (a base model without an LM head? load it with AutoModelForCausalLM)"
        ) from err
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"{name}.{arch.layers} is not a non-empty ModuleList")
    for attr in (arch.attention, arch.mlp):
        if not hasattr(layers[0], attr):
            raise UnsupportedArchitectureError(
                f"decoder block {type(layers[0]).__name__} of {name} has no {attr!r} module "
                f"named in the {arch.family} row"
            )
    return arch


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _resolve(model, architecture_of(model).layers)


def layer_names(model: nn.Module) -> list[str]:
    """Real module names of the decoder blocks, e.g. ``model.layers.3``."""
    prefix = architecture_of(model).layers
    return [f"{prefix}.{i}" for i in range(len(decoder_layers(model)))]


def count_parameters(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def count_bytes(module: nn.Module) -> int:
    """Bytes of the parameters of ``module`` at their stored dtype, shared tensors once."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class Widths:
    """Unit counts of one decoder block: KV head groups, query heads per group, head_dim, neurons."""

    heads: int
    queries_per_head: int
    head_dim: int
    neurons: int

    def features(self, per_unit: str) -> int:
        return {"query": self.queries_per_head * self.head_dim, "kv": self.head_dim, "one": 1}[per_unit]


def widths_of(config, arch: Architecture) -> Widths:
    """The widths a (homogeneous) config gives every block."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    neurons = getattr(config, arch.neuron_field, None) or 4 * hidden
    return Widths(heads=kv, queries_per_head=heads // kv, head_dim=head_dim, neurons=neurons)


def unit_count(widths: Widths, label: str) -> int:
    """Units per block of a :class:`WidthSlice` label."""
    return {"head": widths.heads, "neuron": widths.neurons}[label]


def max_positions(model_config) -> int | None:
    """The longest sequence the model's positions allow (``None``: no limit stated)."""
    for name in ("max_position_embeddings", "n_positions"):
        if isinstance(getattr(model_config, name, None), int):
            return getattr(model_config, name)
    return None


def architecture_for_config(config) -> Architecture:
    """The table row for a config (no model needed)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is not supported; supported model types: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]

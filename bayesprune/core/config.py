"""Configuration dataclasses, one per concern, each validated and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .kinds import KINDS, width_kinds

FORMS = ("per-layer", "uniform")
DRAFT_SIZES = ("0.2", "0.35", "0.5", "0.65", "0.8")  # candidate draft sizes, fractions of decoder parameters
DECODINGS = ("greedy", "sampling")
DEPTH_SCORES = ("nll", "distillation")  # what a conditional depth search scores removals by
WEIGHTS = ("frozen", "joint", "lora")  # what a fit does with the network's weights
DTYPES = ("float32", "bfloat16", "float16", "float64")  # compute dtypes of the network, by torch name


class _JsonConfig:
    """JSON round trip shared by every config dataclass."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__} needs a JSON object, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        try:
            return cls(**values)
        except TypeError as err:  # a value of the wrong type, e.g. a string where a number belongs
            raise ValueError(f"{cls.__name__}: {err}") from err


@dataclass
class GateConfig(_JsonConfig):
    """Which units carry gates: names of :mod:`bayesprune.core.kinds` (``block``, ``attn``, ``mlp``, ``head``,
    ``neuron``), each nested under the kinds above it; at most one width kind per branch."""

    units: tuple[str, ...] = ("head", "neuron")

    def __post_init__(self):
        self.units = tuple(self.units)
        if not self.units:
            raise ValueError("GateConfig.units is empty: name at least one of " + ", ".join(KINDS))
        unknown = [u for u in self.units if u not in KINDS]
        if unknown:
            raise ValueError(f"unknown unit kind(s) {unknown}; known: {list(KINDS)}")
        if len(set(self.units)) != len(self.units):
            raise ValueError(f"GateConfig.units repeats a kind: {list(self.units)}")
        self.units = tuple(k for k in KINDS if k in self.units)
        branches = [KINDS[k].branch for k in width_kinds(self.units)]
        if len(set(branches)) != len(branches):
            raise ValueError(f"GateConfig.units gates one branch's units two ways: {list(width_kinds(self.units))}")


def _finite(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{type(config).__name__}.{name} must be a finite number, got {value!r}")


@dataclass
class PriorConfig(_JsonConfig):
    """The hierarchical shrinkage prior over the cost-conditioned inclusion logits (see :mod:`bayesprune.core.model`).

    Thresholds are clamped cubic B-splines over ``t = cost / (1 + cost)`` with
    ``control_points`` control points, starting at ``threshold_start`` (``−1/T``:
    every unit almost surely on just above cost 0) and rising by ``threshold_rise``
    at the prior's centre; ``temperature`` is ``T``. Per kind, the shared curve's
    increments have prior scale ``shared_curve_scale`` around that rise; layer
    deviations from it are horseshoe-distributed with global scale
    ``HalfCauchy(curve_scale)``. Per unit, ``offset_scale`` is the prior scale of
    the cost-free importance offsets (0: none, the paper's norm-only ranking) and
    ``amplitude_scale`` that of the log-amplitudes.
    """

    control_points: int = 10
    temperature: float = 0.5
    threshold_start: float = -2.0
    threshold_rise: float = 4.0
    shared_curve_scale: float = 1.0
    curve_scale: float = 1.0
    offset_scale: float = 0.5
    amplitude_scale: float = 1.0

    def __post_init__(self):
        _finite(self, "temperature", "threshold_start", "threshold_rise", "shared_curve_scale", "curve_scale",
                "offset_scale", "amplitude_scale")
        if self.control_points < 4:
            raise ValueError(f"PriorConfig.control_points must be >= 4 (cubic), got {self.control_points}")
        for name in ("temperature", "shared_curve_scale", "curve_scale", "amplitude_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PriorConfig.{name} must be positive, got {getattr(self, name)}")
        if self.offset_scale < 0:
            raise ValueError(f"PriorConfig.offset_scale must be >= 0, got {self.offset_scale}")


@dataclass
class CostConfig(_JsonConfig):
    """The cost each step is fitted at (nats of loss per token traded for the whole network).

    ``fixed=None`` (the default) draws a cost afresh at every step: 0 with
    ``zero_probability``, else ``Exponential(rate)``, so one fit answers for every
    cost. A number fixes the cost: the same model and guide, read at that cost only.
    """

    fixed: float | None = None
    zero_probability: float = 1 / 3
    rate: float = 0.3

    def __post_init__(self):
        _finite(self, "zero_probability", "rate")
        if self.fixed is not None:
            _finite(self, "fixed")
            if self.fixed < 0:
                raise ValueError(f"CostConfig.fixed must be >= 0, got {self.fixed}")
        if not 0 <= self.zero_probability < 1:
            raise ValueError(f"CostConfig.zero_probability must be in [0, 1), got {self.zero_probability}")
        if self.rate <= 0:
            raise ValueError(f"CostConfig.rate must be positive, got {self.rate}")


@dataclass
class FitConfig(_JsonConfig):
    """Stochastic variational inference settings."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    weights: str = "lora"  # "frozen", "joint" or "lora" (low-rank adapters, merged when the fit ends)
    guide_lr: float = 0.05
    guide_init_scale: float = 0.01
    weight_lr: float = 1e-5
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    posterior_draws: int = 100
    weight_decay: float = 0.0  # network weights only (decoupled); never the guide's parameters
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine": from the full rate after warm-up down to 0.1×
    dtype: str = "float32"  # the network's compute dtype; gates and the guide are float32 whatever it is
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (memory for time)
    two_point_blocks: int = 0  # blocks per step whose gate gradient is the exact on/off difference (0: straight through)
    block_importance: str = "ones"  # or "removal": each block's NLL rise when removed alone, on 8 fit windows
    lora_rank: int = 8
    lora_alpha: float = 16.0  # adapters add (lora_alpha / lora_rank) · B A
    lora_lr: float = 5e-4
    likelihood: str = "nll"  # or "distillation": KL(p_dense ‖ p_gated) per token, mixed with nll_weight × NLL
    nll_weight: float = 0.0  # the NLL's share in a distillation likelihood

    @property
    def lora_scale(self) -> float:
        """What adapters multiply ``B A`` by."""
        return self.lora_alpha / self.lora_rank

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"FitConfig.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"FitConfig.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"FitConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        _finite(self, "guide_lr", "guide_init_scale", "weight_lr", "clip_norm", "weight_decay")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("FitConfig.weight_decay and warmup_steps must be >= 0")
        if self.block_importance not in ("ones", "removal"):
            raise ValueError(f"FitConfig.block_importance must be 'ones' or 'removal', got {self.block_importance!r}")
        if self.likelihood not in ("nll", "distillation"):
            raise ValueError(f"FitConfig.likelihood must be 'nll' or 'distillation', got {self.likelihood!r}")
        _finite(self, "nll_weight")
        if not 0 <= self.nll_weight <= 1:
            raise ValueError(f"FitConfig.nll_weight must be in [0, 1], got {self.nll_weight}")
        if self.two_point_blocks < 0:
            raise ValueError(f"FitConfig.two_point_blocks must be >= 0, got {self.two_point_blocks}")
        _finite(self, "lora_alpha", "lora_lr")
        if self.lora_alpha <= 0 or self.lora_lr <= 0:
            raise ValueError("FitConfig.lora_alpha and lora_lr must be positive")
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "posterior_draws", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("FitConfig.seq_len must be >= 2 (one token predicts the next)")
        if min(self.guide_lr, self.guide_init_scale, self.weight_lr, self.clip_norm) <= 0:
            raise ValueError("FitConfig learning rates, guide_init_scale and clip_norm must be positive")


@dataclass
class DataConfig(_JsonConfig):
    """Corpus and split settings. ``path=None`` means the Shakespeare corpus."""

    path: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    eval_tokens: int = 16384
    eval_window: int = 256

    def __post_init__(self):
        if not (0 <= self.validation_fraction < 1 and 0 < self.test_fraction < 1):
            raise ValueError("split fractions must lie in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave documents to fit on")
        if self.eval_tokens < 2 or self.eval_window < 2:
            raise ValueError("eval_tokens and eval_window must be >= 2")
        if self.eval_tokens < self.eval_window:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must be at least one eval_window "
                             f"({self.eval_window})")


@dataclass
class DepthConfig(_JsonConfig):
    """How ``bayesprune depth`` re-scores a run's depth ranking conditionally: ``removals`` blocks
    ranked (``None``: half of them), on at most ``windows`` seeded fit windows, each candidate scored
    on ``chunk`` of them first and on more where the choice is uncertain, by ``score`` (``nll`` of
    the corpus, or ``distillation``: KL from the dense network)."""

    removals: int | None = None
    windows: int = 32
    chunk: int = 8
    score: str = "nll"

    def __post_init__(self):
        if self.score not in DEPTH_SCORES:
            raise ValueError(f"the depth score must be one of {DEPTH_SCORES}, not {self.score!r}")
        if not 2 <= self.chunk <= self.windows:
            raise ValueError(f"need 2 <= chunk <= windows, got chunk {self.chunk} and {self.windows} windows")


@dataclass
class DraftConfig(_JsonConfig):
    """How ``bayesprune draft`` sizes a speculative-decoding draft from a run: every target in ``sizes``
    is a candidate, cut in ``form``; its acceptance is read on the target's own continuations
    (``new_tokens`` after ``prompt_tokens``) of ``num_prompts`` validation prompts, for ``decoding``
    (``greedy``: argmax agreement; ``sampling``: ``E[Σ min(p, q)]``); draft lengths up to
    ``max_gamma`` are weighed. ``vocab_share`` trims the draft's head to the tokens covering that share
    of the fitting corpus; ``draft_dtype`` is the dtype the draft will decode in."""

    sizes: tuple[str, ...] = DRAFT_SIZES
    form: str = "uniform"
    vocab_share: float | None = None
    decoding: str = "greedy"
    num_prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 48
    max_gamma: int = 8
    draft_dtype: str | None = None

    def __post_init__(self):
        self.sizes = tuple(str(size) for size in self.sizes)
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, not {self.decoding!r}")
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, not {self.form!r}")
        if self.vocab_share is not None and not 0 < self.vocab_share <= 1:
            raise ValueError(f"the vocabulary share must be in (0, 1], not {self.vocab_share}")
        if not self.sizes:
            raise ValueError("give at least one candidate draft size")
        if min(self.num_prompts, self.prompt_tokens, self.new_tokens, self.max_gamma) < 1:
            raise ValueError("prompts, prompt tokens, new tokens and the longest draft must each be at least 1")
        if self.draft_dtype is not None and self.draft_dtype not in DTYPES:
            raise ValueError(f"the draft dtype must be one of {DTYPES}, not {self.draft_dtype!r}")
        self.targets  # every size must read as a target

    @property
    def targets(self) -> list:
        """The candidate sizes as :class:`~bayesprune.core.targets.Target` objects."""
        from .targets import Target

        return [Target.parse(size) for size in self.sizes]


@dataclass
class RouterConfig(_JsonConfig):
    """How a prompt router is built over domains of text (``bayesprune router``, ``fit_routed_model``).

    Each domain's first ``search_windows`` fit windows choose its candidate set of ``skipped``
    blocks (``None``: a fifth of the blocks, about PuDDing's 7 of 32) by the conditional depth search (with
    ``posterior_steps``, weighing only the ``candidates`` blocks its block posterior needs least;
    with ``max_swaps``, refined by single swaps); the next ``train_windows`` train the router on
    their first ``prompt_tokens``, read after the first ``route_after`` blocks. A route falls back
    to the blocks the likely sets share unless its best set is that with probability
    ``confidence`` or within ``tolerance`` nats of the others. ``seq_len``, ``check_windows``
    (validation windows scored per domain) and ``seed`` (the window order) are the job's.
    """

    skipped: int | None = None
    route_after: int = 2
    prompt_tokens: int = 32
    seq_len: int = 128
    search_windows: int = 32
    train_windows: int = 128
    check_windows: int = 32
    confidence: float = 0.9
    tolerance: float = 0.02
    posterior_steps: int = 0
    candidates: int = 8
    max_swaps: int = 0
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.prompt_tokens < self.seq_len:
            raise ValueError(f"prompt tokens must be in [1, seq_len={self.seq_len}), got {self.prompt_tokens}")
        if self.search_windows < 2 or self.train_windows < 1 or self.check_windows < 0:
            raise ValueError("need at least 2 search windows, 1 training window and 0 check windows per domain")
        if self.posterior_steps < 0 or self.candidates < 1 or self.max_swaps < 0:
            raise ValueError(f"posterior steps and max swaps must be at least 0 and candidates at least 1, not "
                             f"{self.posterior_steps}, {self.max_swaps} and {self.candidates}")
        if not 0 < self.confidence <= 1 or self.tolerance < 0:
            raise ValueError(f"confidence must be in (0, 1] and tolerance at least 0, not {self.confidence} and "
                             f"{self.tolerance}")


@dataclass
class ExtractionConfig(_JsonConfig):
    """What to cut from a fitted run: the target size, the checkpoint form, the neuron rounding.

    ``target`` is read by :meth:`bayesprune.core.targets.Target.parse` (``None``: fit only);
    ``form`` is ``per-layer`` (each block its own widths) or ``uniform`` (plain
    ``transformers`` loads it); ``multiple`` rounds kept neurons per block.
    """

    target: str | None = "0.75"
    form: str = "per-layer"
    multiple: int = 1

    def __post_init__(self):
        from .targets import Target, TargetError

        if self.target is not None:
            self.target = str(self.target)
            Target.parse(self.target)
        if self.form not in FORMS:
            raise TargetError(f"unknown form {self.form!r}; choose one of {list(FORMS)}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise TargetError(f"multiple must be an integer >= 1, got {self.multiple!r}")

    @property
    def parsed(self):
        """The target as a :class:`~bayesprune.core.targets.Target` (``None``: no extraction)."""
        from .targets import Target

        return None if self.target is None else Target.parse(self.target)


@dataclass
class RunConfig(_JsonConfig):
    """Everything a run was made with; written as ``config.json`` in the run directory."""

    model: str | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    data: DataConfig = field(default_factory=DataConfig)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        if not isinstance(values, dict):
            raise ValueError(f"RunConfig needs a JSON object, got {type(values).__name__}")
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"RunConfig has no field(s) {unknown}")
        if values.get("model") is not None and not isinstance(values["model"], str):
            raise ValueError(f"RunConfig.model must be a path or null, got {values['model']!r}")
        return cls(
            model=values.get("model"),
            gate=GateConfig.from_dict(values.get("gate", {})),
            prior=PriorConfig.from_dict(values.get("prior", {})),
            cost=CostConfig.from_dict(values.get("cost", {})),
            fit=FitConfig.from_dict(values.get("fit", {})),
            data=DataConfig.from_dict(values.get("data", {})),
        )

    def resolved(self) -> "RunConfig":
        """The same settings with local model and data paths absolute, so that a run reads the same from anywhere
        (a model that is not a local path, a hub id, stays as it is)."""
        def absolute(path: str | None) -> str | None:
            local = None if path is None else Path(path).expanduser()
            return str(local.resolve()) if local is not None and local.exists() else path
        return dataclasses.replace(self, model=absolute(self.model),
                                   data=dataclasses.replace(self.data, path=absolute(self.data.path)))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

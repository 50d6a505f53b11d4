"""Configuration dataclasses, one per concern, each validated and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

UNIT_KINDS = ("block", "attn", "mlp", "head", "neuron")
WIDTH_KINDS = ("head", "neuron")


class _JsonConfig:
    """JSON round trip shared by every config dataclass."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        return cls(**values)


@dataclass
class GateConfig(_JsonConfig):
    """Which units carry gates.

    ``block`` gates a decoder block's whole residual update; ``attn`` and ``mlp``
    gate the attention and MLP branches inside it; ``head`` gates key/value head
    groups (a KV head with the query heads that read it) and ``neuron`` FFN hidden
    units. Each is nested under the kinds above it.
    """

    units: tuple[str, ...] = ("block",)

    def __post_init__(self):
        self.units = tuple(self.units)
        if not self.units:
            raise ValueError("GateConfig.units is empty: name at least one of " + ", ".join(UNIT_KINDS))
        unknown = [u for u in self.units if u not in UNIT_KINDS]
        if unknown:
            raise ValueError(f"unknown unit kind(s) {unknown}; known: {list(UNIT_KINDS)}")
        if len(set(self.units)) != len(self.units):
            raise ValueError(f"GateConfig.units repeats a kind: {list(self.units)}")
        self.units = tuple(k for k in UNIT_KINDS if k in self.units)


@dataclass
class PriorConfig(_JsonConfig):
    """Hierarchical shrinkage prior over the gate inclusion logits.

    Per unit kind: ``mean_logit ~ Normal(mean_logit_loc, mean_logit_scale)`` and
    ``global_scale ~ HalfCauchy(global_scale)``; per unit:
    ``local_scale ~ HalfCauchy(1)`` and
    ``logit ~ Normal(mean_logit, global_scale * local_scale)``.
    ``cost`` (nats of loss per token for the whole network) tilts the prior by
    ``exp(-cost * tokens * kept_fraction)``.
    """

    mean_logit_loc: float = 1.5
    mean_logit_scale: float = 2.0
    global_scale: float = 1.0
    cost: float = 0.5
    temperature: float = 0.5

    def __post_init__(self):
        if self.mean_logit_scale <= 0 or self.global_scale <= 0:
            raise ValueError("PriorConfig scales must be positive")
        if self.cost < 0:
            raise ValueError(f"PriorConfig.cost must be >= 0, got {self.cost}")
        if self.temperature <= 0:
            raise ValueError(f"PriorConfig.temperature must be positive, got {self.temperature}")


@dataclass
class FitConfig(_JsonConfig):
    """Stochastic variational inference settings."""

    steps: int = 150
    batch_size: int = 4
    seq_len: int = 128
    weights: str = "frozen"  # "frozen" or "joint"
    guide_lr: float = 0.1
    weight_lr: float = 1e-5
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25
    posterior_draws: int = 1000
    weight_decay: float = 0.0  # network weights only (decoupled); never the guide's parameters
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine": from the full rate after warm-up down to 0.1×

    def __post_init__(self):
        if self.weights not in ("frozen", "joint"):
            raise ValueError(f"FitConfig.weights must be 'frozen' or 'joint', got {self.weights!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"FitConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("FitConfig.weight_decay and warmup_steps must be >= 0")
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "posterior_draws"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("FitConfig.seq_len must be >= 2 (one token predicts the next)")
        if self.guide_lr <= 0 or self.weight_lr <= 0 or self.clip_norm <= 0:
            raise ValueError("FitConfig learning rates and clip_norm must be positive")


@dataclass
class AmortisedConfig(_JsonConfig):
    """The cost-amortised (push puppet) guide: one fit for every cost.

    Each step draws a cost ``λ``: 0 with ``zero_probability``, else
    ``Exponential(rate)``. Curves over ``t = λ / (1 + λ)`` are clamped cubic
    B-splines with ``control_points`` control points; thresholds start at
    ``threshold_start`` (``−1/T`` makes every unit almost surely on just above cost 0).
    Layer threshold curves deviate from their kind's shared curve under
    ``Normal(0, σ_kind)``, ``σ²_kind ~ InverseGamma(2, curve_scale²)``. ``prior_inclusion`` is the
    prior probability that a unit is on (the KL target of the gates). ``offset_scale``
    gives every unit a learned, cost-free correction to its importance under
    ``Normal(0, offset_scale)`` (0: importance is the weight norm alone, as in the paper).
    """

    zero_probability: float = 1 / 3
    rate: float = 0.3
    control_points: int = 10
    temperature: float = 0.5
    threshold_start: float = -2.0
    threshold_rise: float = 4.0
    curve_scale: float = 1.0
    prior_inclusion: float = 0.8
    lr: float = 0.05
    offset_scale: float = 0.5

    def __post_init__(self):
        if not 0 <= self.zero_probability < 1:
            raise ValueError(f"AmortisedConfig.zero_probability must be in [0, 1), got {self.zero_probability}")
        if self.rate <= 0 or self.temperature <= 0 or self.curve_scale <= 0 or self.lr <= 0:
            raise ValueError("AmortisedConfig rate, temperature, curve_scale and lr must be positive")
        if self.control_points < 4:
            raise ValueError(f"AmortisedConfig.control_points must be >= 4 (cubic), got {self.control_points}")
        if not 0 < self.prior_inclusion < 1:
            raise ValueError(f"AmortisedConfig.prior_inclusion must be in (0, 1), got {self.prior_inclusion}")
        if self.offset_scale < 0:
            raise ValueError(f"AmortisedConfig.offset_scale must be >= 0, got {self.offset_scale}")


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


@dataclass
class RunConfig(_JsonConfig):
    """Everything a run was made with; written as ``config.json`` in the run directory."""

    model: str | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    amortised: AmortisedConfig | None = None  # set: one cost-amortised fit instead of one at prior.cost

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        return cls(
            model=values.get("model"),
            gate=GateConfig.from_dict(values.get("gate", {})),
            prior=PriorConfig.from_dict(values.get("prior", {})),
            fit=FitConfig.from_dict(values.get("fit", {})),
            data=DataConfig.from_dict(values.get("data", {})),
            amortised=AmortisedConfig.from_dict(values["amortised"]) if values.get("amortised") else None,
        )

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

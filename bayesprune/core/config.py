"""Configuration dataclasses, one per concern, each validated and saved as JSON.

Every field is an option of the command line, named after it (``--batch-size``); a field made
with :func:`option` carries its help text and choices, which the CLI reads (:mod:`bayesprune.run.cli`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .kinds import KINDS, width_kinds
from .schema import of_annotation, validate

FORMS = ("per-layer", "uniform")
DRAFT_SIZES = ("0.2", "0.35", "0.5", "0.65", "0.8")  # candidate draft sizes, fractions of decoder parameters
DECODINGS = ("greedy", "sampling")
DEPTH_SCORES = ("nll", "distillation")  # what a conditional depth search scores removals by
LIKELIHOODS = ("nll", "distillation")  # what a fit scores the gated network by
WEIGHTS = ("frozen", "joint", "lora")  # what a fit does with the network's weights
RECONSTRUCTIONS = ("none", "least-squares", "bias", "least-squares+bias")  # what an extraction does to the kept weights
COST_SPACINGS = ("random", "stratified")  # how a fit spreads its steps' costs over the cost distribution
DTYPES = ("float32", "bfloat16", "float16", "float64")  # compute dtypes of the network, by torch name
FIT_DTYPES = ("auto",) + DTYPES  # auto: bfloat16 where the device computes it natively, else float32


def option(default, help: str = "", choices=None, **values):
    """A config field with the help text and choices its command-line option shows."""
    return field(default=default, metadata={"help": help, "choices": choices}, **values)


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
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            if item.name in values:
                validate(values[item.name], of_annotation(hints[item.name], item.metadata.get("choices")),
                         f"{cls.__name__}.{item.name}")
        return cls(**values)


@dataclass
class GateConfig(_JsonConfig):
    """Which units carry gates: names of :mod:`bayesprune.core.kinds` (``block``, ``attn``, ``mlp``, ``head``,
    ``neuron``), each nested under the kinds above it; at most one width kind per branch."""

    units: tuple[str, ...] = option(("head", "neuron"), "comma-separated gate kinds: " + "; ".join(
        f"{k} ({v.description})" for k, v in KINDS.items()))

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


def _seed(config) -> None:
    if not isinstance(config.seed, int) or not 0 <= config.seed < 2 ** 63:
        raise ValueError(f"{type(config).__name__}.seed must be an integer in [0, 2**63), got {config.seed!r}")


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

    control_points: int = option(10, "spline control points of every threshold and amplitude curve")
    temperature: float = option(0.5, "T: inclusion logits are divided by it")
    threshold_start: float = option(-2.0, "every threshold curve's value at cost 0")
    threshold_rise: float = option(4.0, "the prior's centre of each threshold curve's rise")
    shared_curve_scale: float = option(1.0, "prior scale of a kind's shared curve around that rise")
    curve_scale: float = option(1.0, "HalfCauchy scale of the layer deviations' global scale")
    offset_scale: float = option(0.5, "prior scale of the per-unit importance offsets (0: none, the paper's "
                                      "norm-only ranking)")
    amplitude_scale: float = option(1.0, "prior scale of the per-unit log-amplitudes")

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

    ``fixed=None`` (the default) takes a new cost at every step: 0 with
    ``zero_probability``, else ``Exponential(rate)``, so one fit answers for every
    cost. A number fixes the cost: the same model and guide, read at that cost only.
    ``spacing`` says how the steps' costs are spread over that distribution: ``stratified``
    (the default: its quantiles at a golden-ratio sequence of levels from a seeded start, so
    that every run of steps covers it evenly) or ``random`` (independent draws). ``per_step``
    splits each step's mini-batch into that many parts, each fitted at its own cost (stratified:
    evenly spaced levels), so that one step averages the ELBO over the cost distribution.
    """

    fixed: float | None = option(None, "fit at this one cost (nats of loss per token traded for the whole network) "
                                       "instead of drawing a cost every step so that one fit answers for every size")
    zero_probability: float = option(1 / 3, "probability that a step fits the dense model, at cost 0 (unless a fixed "
                                            "cost)")
    rate: float = option(0.3, "costs are drawn from Exponential(rate) (unless a fixed cost)")
    spacing: str = option("stratified", "the steps' costs: stratified (every run of steps covers the cost "
                                        "distribution evenly), or independent draws", COST_SPACINGS)
    per_step: int = option(1, "costs per step: the mini-batch is split into this many parts, each at its own cost")

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
        if self.spacing not in COST_SPACINGS:
            raise ValueError(f"CostConfig.spacing must be one of {COST_SPACINGS}, got {self.spacing!r}")
        if self.per_step < 1:
            raise ValueError(f"CostConfig.per_step must be >= 1, got {self.per_step}")


@dataclass
class FitConfig(_JsonConfig):
    """Stochastic variational inference settings."""

    steps: int = option(750, "SVI steps")
    chains: int = option(1, "independent fits from seeds seed, seed+1, … pooled into one posterior: with two or "
                            "more, R-hat says whether they agree, and the plan reads the chain whose cut at the target "
                            "scores best on validation windows (without a target: the best validation ELBO)")
    batch_size: int = option(4, "token windows per step")
    seq_len: int = option(128, "tokens per window")
    weights: str = option("lora", "frozen, trained jointly with the gates, or lora: low-rank adapters fitted with the "
                                  "gates and merged into the extracted model", WEIGHTS)
    guide_lr: float = option(0.05, "the guide's learning rate")
    guide_init_scale: float = option(0.01, "the guide's starting scale")
    weight_lr: float = option(1e-5, "the network's learning rate (joint weights)")
    clip_norm: float = option(1.0, "gradient norm clipping")
    seed: int = option(0, "seed of costs, mini-batches, gates and adapters")
    checkpoint_every: int = option(25, "steps between checkpoints")
    posterior_draws: int = option(100, "draws of the posterior its summaries read")
    weight_decay: float = option(0.0, "decoupled weight decay of the network's weights (never the guide's)")
    warmup_steps: int = option(0, "steps of linear learning-rate warm-up")
    schedule: str = option("cosine", "after warm-up: constant, or cosine down to 0.1x", ("constant", "cosine"))
    dtype: str = option("auto", "the network's compute dtype; auto: bfloat16 on a device with native bfloat16 "
                                "arithmetic (CUDA; CPUs with AMX or AVX-512 BF16), else float32, and float32 for "
                                "joint weights (gates, guide and adapters stay float32; written checkpoints keep "
                                "the source model's dtype)", FIT_DTYPES)
    gradient_checkpointing: bool = option(False, "recompute block activations in the backward pass: less memory, "
                                                 "more time")
    two_point_blocks: int = option(0, "blocks per step whose gate gradient is the exact on/off difference of the "
                                      "loss (one extra forward each; 0: straight-through gradients)")
    critical_nll: float = option(0.5, "units whose removal alone raises the NLL on 4 fit windows by more than this "
                                      "(nats per token) get a prior offset that keeps them in (0: no scan)")
    block_importance: str = option("ones", "block gates' importance: ones, or removal (each block's NLL rise when "
                                           "removed alone, on 8 fit windows)", ("ones", "removal"))
    lora_rank: int = option(8, "rank of the adapters")
    lora_alpha: float = option(16.0, "adapters add (lora_alpha / lora_rank) · B A")
    lora_lr: float = option(5e-4, "the adapters' learning rate")
    likelihood: str = option("nll", "score the gated network by next-token NLL of the corpus, or by KL from the "
                                    "dense network", LIKELIHOODS)
    nll_weight: float = option(0.0, "the NLL's share in a distillation likelihood (0: pure KL)")

    @property
    def lora_scale(self) -> float:
        """What adapters multiply ``B A`` by."""
        return self.lora_alpha / self.lora_rank

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"FitConfig.weights must be one of {WEIGHTS}, got {self.weights!r}")
        if self.dtype not in FIT_DTYPES:
            raise ValueError(f"FitConfig.dtype must be one of {list(FIT_DTYPES)}, got {self.dtype!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"FitConfig.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        _finite(self, "guide_lr", "guide_init_scale", "weight_lr", "clip_norm", "weight_decay")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("FitConfig.weight_decay and warmup_steps must be >= 0")
        if self.block_importance not in ("ones", "removal"):
            raise ValueError(f"FitConfig.block_importance must be 'ones' or 'removal', got {self.block_importance!r}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"FitConfig.likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}")
        _finite(self, "nll_weight", "critical_nll")
        if self.critical_nll < 0:
            raise ValueError(f"FitConfig.critical_nll must be >= 0, got {self.critical_nll}")
        if not 0 <= self.nll_weight <= 1:
            raise ValueError(f"FitConfig.nll_weight must be in [0, 1], got {self.nll_weight}")
        if self.two_point_blocks < 0:
            raise ValueError(f"FitConfig.two_point_blocks must be >= 0, got {self.two_point_blocks}")
        _finite(self, "lora_alpha", "lora_lr")
        if self.lora_alpha <= 0 or self.lora_lr <= 0:
            raise ValueError("FitConfig.lora_alpha and lora_lr must be positive")
        for name in ("steps", "chains", "batch_size", "seq_len", "checkpoint_every", "posterior_draws", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"FitConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError("FitConfig.seq_len must be >= 2 (one token predicts the next)")
        _seed(self)
        if min(self.guide_lr, self.guide_init_scale, self.weight_lr, self.clip_norm) <= 0:
            raise ValueError("FitConfig learning rates, guide_init_scale and clip_norm must be positive")


@dataclass
class DataConfig(_JsonConfig):
    """Corpus and split settings. ``path``: a domain (one of ``bayesprune.inputs.data.DOMAINS``), a
    comma list of them, or a text file, folder or ``.jsonl``; ``None`` means the mixture of every domain."""

    path: str | None = option(None, "a domain (shakespeare, kjv, python, sotu, sherlock), a comma list of them, or "
                                    "a text file, folder or .jsonl (default: the mixture of every domain, in equal "
                                    "shares)")
    validation_fraction: float = option(0.1, "share of documents held out for validation")
    test_fraction: float = option(0.1, "share of documents held out for test")
    eval_tokens: int = option(16384, "test tokens perplexity is measured on")
    eval_window: int = option(256, "tokens per perplexity window")

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

    removals: int | None = option(None, "how many blocks to rank for removal (default: half)")
    windows: int = option(32, "fit-split windows the search may score (seeded; spent where a choice is uncertain)")
    chunk: int = option(8, "windows every candidate is scored on first")
    score: str = option("nll", "nll (next-token NLL of the corpus) or distillation (KL from the dense network)",
                        DEPTH_SCORES)

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

    sizes: tuple[str, ...] = option(DRAFT_SIZES, "candidate sizes, comma-separated (any extraction target: 0.5, "
                                                 "12layers, 80M …)")
    form: str = option("uniform", "uniform (loads with plain transformers) or per-layer widths", FORMS)
    vocab_share: float | None = option(None, "draft head over the tokens covering this share of the fitting corpus "
                                             "(default: all)")
    decoding: str = option("greedy", "which acceptance the prediction uses: greedy (argmax agreement) or sampling",
                           DECODINGS)
    num_prompts: int = option(8, "validation prompts the acceptance is read on")
    prompt_tokens: int = option(32, "tokens of each prompt")
    new_tokens: int = option(48, "target tokens continued after each prompt")
    max_gamma: int = option(8, "the longest draft length weighed")
    draft_dtype: str | None = option(None, "dtype the draft decodes in (default: --dtype)", DTYPES)

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

    skipped: int | None = option(None, "blocks each candidate set skips (default: 20 %)")
    route_after: int = option(2, "the router reads the hidden state entering this block; no set skips the blocks "
                                 "before it")
    prompt_tokens: int = option(32, "prompt tokens the router reads in training")
    seq_len: int = option(128, "tokens per window")
    search_windows: int = option(32, "fit windows per domain its depth search may score")
    train_windows: int = option(128, "further fit windows per domain that train the router")
    check_windows: int = option(32, "validation windows per domain on which the router is checked (0: none)")
    confidence: float = option(0.9, "P(best) a route needs")
    tolerance: float = option(0.02, "or the expected regret (nats per token) it may carry; otherwise only the blocks "
                                    "the likely sets share are skipped")
    posterior_steps: int = option(0, "fit each domain's block posterior (frozen weights, SVI steps) and let each "
                                      "search step weigh only its --candidates least-needed blocks (0: the search "
                                      "weighs every block)")
    candidates: int = option(8, "blocks each search step weighs, with a posterior")
    max_swaps: int = option(0, "then refine each domain's set by up to this many single swaps (a skipped block for a "
                               "kept one), each only if it lowers the loss on the search windows (0: the greedy set)")
    seed: int = option(0, "seed of the window order")

    def __post_init__(self):
        if not 1 <= self.prompt_tokens < self.seq_len:
            raise ValueError(f"prompt tokens must be in [1, seq_len={self.seq_len}), got {self.prompt_tokens}")
        if self.search_windows < 2 or self.train_windows < 1 or self.check_windows < 0:
            raise ValueError("need at least 2 search windows, 1 training window and 0 check windows per domain")
        if self.posterior_steps < 0 or self.candidates < 1 or self.max_swaps < 0:
            raise ValueError(f"posterior steps and max swaps must be at least 0 and candidates at least 1, not "
                             f"{self.posterior_steps}, {self.max_swaps} and {self.candidates}")
        _seed(self)
        if not 0 < self.confidence <= 1 or self.tolerance < 0:
            raise ValueError(f"confidence must be in (0, 1] and tolerance at least 0, not {self.confidence} and "
                             f"{self.tolerance}")


@dataclass
class ExtractionConfig(_JsonConfig):
    """What to cut from a fitted run: the target size, the checkpoint form, the neuron rounding, how much of the
    fitted adapters goes in, and any refit or recovery fine-tuning.

    ``target`` is read by :meth:`bayesprune.core.targets.Target.parse` (``None``: fit only);
    ``form`` is ``per-layer`` (each block its own widths) or ``uniform`` (plain
    ``transformers`` loads it); ``multiple`` rounds kept neurons per block; ``adapter_share``
    scales an adapter fit's weight change before it is merged (``W + share · (α / r) · B A``).
    """

    target: str | None = option("0.75", "size to extract: 0.75, 75%, 12layers, 80M, 300MB, 40%flops, or 'none'")
    form: str = option("per-layer", "per-layer widths (load with bayesprune.load_pruned) or the same widths in every "
                                    "block (loads in plain transformers)", FORMS)
    multiple: int = option(1, "round kept neurons per block to a multiple of this")
    adapter_share: float = option(0.5, "share of an adapter fit's weight change merged into the cut: 1 all of it, "
                                       "0 none; between, a weight-space ensemble of the original and the adapted "
                                       "network (WiSE-FT), which keeps more on text the fit never saw")
    reconstruction: str = option("none", "refit each narrowed output projection to reproduce the dense one on "
                                         "calibration text: its kept columns by least squares, a bias making up "
                                         "the mean of what it misses (FLAP), or both; needs the model in memory",
                                 RECONSTRUCTIONS)
    calibration_tokens: int = option(16384, "tokens of the run's fit split the reconstruction refits on")
    damping: float = option(1.0, "ridge pulling refitted weights towards the cut ones, as a share of the kept "
                                 "inputs' mean second moment (0: plain least squares)")
    recovery_steps: int | None = option(None, "steps of recovery fine-tuning of the cut model on the run's fit split "
                                              "(every weight but the token embeddings; 4 windows of the fit's length "
                                              "a step); needs the model in memory (0: none, and a cut can be "
                                              "streamed; default: by the cut, 200 x the share of decoder parameters "
                                              "removed, at least 50)")
    recovery_lr: float = option(1e-4, "the recovery's peak learning rate (warm-up, then cosine down to 0.1x)")
    recovery_likelihood: str = option("nll", "what the recovery trains on: next-token NLL of the fit split, or KL "
                                             "from the dense network the run started from on the same text "
                                             "(distillation; loads that network beside the cut)", LIKELIHOODS)

    def __post_init__(self):
        from .targets import Target, TargetError

        if self.target is not None:
            self.target = str(self.target)
            Target.parse(self.target)
        if self.form not in FORMS:
            raise TargetError(f"unknown form {self.form!r}; choose one of {list(FORMS)}")
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise TargetError(f"multiple must be an integer >= 1, got {self.multiple!r}")
        if not 0 <= self.adapter_share <= 1:
            raise ValueError(f"adapter_share must be between 0 and 1, got {self.adapter_share}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, not {self.reconstruction!r}")
        if self.calibration_tokens < 1:
            raise ValueError(f"calibration_tokens must be at least 1, got {self.calibration_tokens}")
        if not 0 <= self.damping < math.inf:
            raise ValueError(f"damping must be a finite number >= 0, got {self.damping}")
        if self.recovery_steps is not None and (not isinstance(self.recovery_steps, int) or self.recovery_steps < 0):
            raise ValueError(f"recovery_steps must be an integer >= 0, got {self.recovery_steps!r}")
        if not 0 < self.recovery_lr < math.inf:
            raise ValueError(f"recovery_lr must be a finite number > 0, got {self.recovery_lr}")
        if self.recovery_likelihood not in LIKELIHOODS:
            raise ValueError(f"recovery_likelihood must be one of {LIKELIHOODS}, not {self.recovery_likelihood!r}")

    @property
    def in_memory(self) -> bool:
        """Whether this extraction runs the cut model (a reconstruction or a recovery), so needs it in memory."""
        return self.reconstruction != "none" or self.recovery_steps != 0

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

    def resolved(self, data_path: str | None) -> "RunConfig":
        """The same settings with a local model path absolute and the corpus ``data_path`` (as the corpus
        reader resolves it), so that a run reads the same from anywhere (a hub id stays as it is)."""
        local = None if self.model is None else Path(self.model).expanduser()
        model = str(local.resolve()) if local is not None and local.exists() else self.model
        return dataclasses.replace(self, model=model, data=dataclasses.replace(self.data, path=data_path))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

"""Speculative decoding with pruned drafts, through ``transformers`` assisted generation.

A draft proposes ``γ`` tokens; the target scores them in one forward pass and keeps
the longest prefix it agrees with, plus one token of its own, so greedy output is the
target's, token for token. With a per-token acceptance rate ``α``, a draft that costs
``c`` target steps per token and a verification pass that costs ``v(γ)`` target steps,
the expected speed-up over plain decoding is (Leviathan et al. 2023, with ``v = 1``)::

    S(α, γ, c) = (1 − α^(γ+1)) / ((1 − α) (γ c + v(γ)))

This module holds the pieces: the formula, acceptance predicted from logits without
generating, decode timings, a draft that is the target with blocks skipped (shared
weights, its own KV cache), a draft head over a trimmed vocabulary, and a counter of
what the draft actually got accepted in a ``generate`` call.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import re
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.generation.candidate_generator import AssistedCandidateGenerator, CandidateGenerator

from ..core.architectures import architecture_of, decoder_layers
from ..cut.extraction import depth_config


def expected_speedup(alpha: float, gamma: int, cost_ratio: float, verify_ratio: float = 1.0) -> float:
    """Expected tokens per unit of target time, relative to plain decoding: ``S(α, γ, c)`` above."""
    if gamma < 1:
        raise ValueError(f"gamma must be at least 1, not {gamma}")
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * cost_ratio + verify_ratio)


def best_gamma(alpha: float, cost_ratio: float, verify_ratios: dict[int, float] | None = None,
               max_gamma: int = 8) -> tuple[int, float]:
    """The draft length with the highest expected speed-up, and that speed-up; ``verify_ratios[γ]`` is the
    cost of scoring ``γ + 1`` tokens in one target pass relative to one token (1 where not given)."""
    verify_ratios = verify_ratios or {}
    scored = [(expected_speedup(alpha, g, cost_ratio, verify_ratios.get(g, 1.0)), g) for g in range(1, max_gamma + 1)]
    speedup, gamma = max(scored)
    return gamma, speedup


def restrict_logits(logits: torch.Tensor, vocabulary: torch.Tensor | None) -> torch.Tensor:
    """Logits with every token outside ``vocabulary`` at ``-inf`` (what a trimmed draft head gives)."""
    if vocabulary is None:
        return logits
    restricted = torch.full_like(logits, float("-inf"))
    return restricted.index_copy_(-1, vocabulary.to(logits.device), logits.index_select(-1, vocabulary.to(logits.device)))


def acceptance(target_logits: torch.Tensor, draft_logits: torch.Tensor,
               vocabulary: torch.Tensor | None = None) -> dict[str, float]:
    """Predicted acceptance of a draft from both models' logits on the same text.

    ``sampling``: ``E[Σ_x min(p(x), q(x))]``, the rate at which speculative sampling
    accepts a drafted token; ``greedy``: how often the two argmaxes agree, the rate
    for greedy decoding. With ``vocabulary``, the draft only proposes those tokens.
    """
    p = target_logits.float().softmax(-1)
    draft_logits = restrict_logits(draft_logits.float(), vocabulary)
    q = draft_logits.softmax(-1)
    return {"sampling": torch.minimum(p, q).sum(-1).mean().item(),
            "greedy": (p.argmax(-1) == draft_logits.argmax(-1)).float().mean().item(),
            "tokens": int(p[..., 0].numel())}


@torch.inference_mode()
def decode_ms(model, steps=(1,), context: int = 64, repeats: int = 7) -> dict[int, float]:
    """Median milliseconds of one forward pass over ``k`` new tokens after a cached ``context``, per ``k`` in
    ``steps`` (``k = 1`` is a decoding step, ``k = γ + 1`` a verification pass)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.get_text_config().vocab_size, (1, context), device=device,
                           generator=torch.Generator(device).manual_seed(0))
    cache = DynamicCache(config=model.config)
    model(prompt, **_with_cache(model, cache), use_cache=True, logits_to_keep=1)
    timings = {}
    for k in steps:
        new = prompt[:, :k]
        samples = []
        for i in range(repeats + 2):
            _synchronise(device)
            started = time.perf_counter()
            model(new, **_with_cache(model, cache), use_cache=True, logits_to_keep=k)
            _synchronise(device)
            cache.crop(-k)
            if i >= 2:  # the first passes warm up kernels and allocators
                samples.append((time.perf_counter() - started) * 1000)
        timings[k] = statistics.median(samples)
    return timings


def _with_cache(model, cache) -> dict:
    """The keyword ``model.forward`` takes its KV cache by: ``cache``, or ``past_key_values`` in older releases."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- a draft that is the target with blocks skipped ---------------------------------------------------------


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object holding the same parameters, buffers and children (its own dicts of them)."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


class _Renumbered(nn.Module):
    """A shared decoder block run under another index: its attention reads and writes that slot of the
    draft's own KV cache."""

    def __init__(self, block: nn.Module, index: int):
        super().__init__()
        self.block = block
        self.index = index
        self._indexed = [m for m in block.modules() if hasattr(m, "layer_idx")]

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):
        saved = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            m.layer_idx = self.index
        try:
            return self.block(*args, **kwargs)
        finally:
            for m, index in zip(self._indexed, saved):
                m.layer_idx = index


def skip_blocks(model, skipped) -> nn.Module:
    """The target with the blocks ``skipped`` left out, as a model ``generate(assistant_model=…)`` accepts.

    Every weight is the target's own (no copy, no extra memory); the draft has its own
    config (the kept blocks' layer count and per-block fields) and so its own, shorter
    KV cache.
    """
    arch = architecture_of(model)
    layers = decoder_layers(model)
    skipped = sorted({int(i) for i in skipped})
    if any(not 0 <= i < len(layers) for i in skipped) or len(skipped) == len(layers):
        raise ValueError(f"blocks to skip must be some of 0..{len(layers) - 1}, not {skipped}")
    keep = [i for i in range(len(layers)) if i not in skipped]
    view = _shallow_copy(model)
    view.config = depth_config(model.config, keep, len(layers), arch)
    view.generation_config = copy.deepcopy(model.generation_config)
    view.skipped_blocks = skipped
    path = arch.layers.split(".")
    parent = view
    for name in path[:-1]:
        child = _shallow_copy(getattr(parent, name))
        if hasattr(child, "config"):
            child.config = view.config
        setattr(parent, name, child)
        parent = child
    setattr(parent, path[-1], nn.ModuleList([_Renumbered(layers[i], new) for new, i in enumerate(keep)]))
    return view


# -- a draft head over part of the vocabulary ---------------------------------------------------------------


def vocabulary_for_share(tokens: torch.Tensor, share: float, vocab_size: int,
                         always: tuple[int, ...] = ()) -> torch.Tensor:
    """The most frequent token ids of ``tokens`` that together cover ``share`` of them (plus ``always``),
    sorted."""
    if not 0 < share <= 1:
        raise ValueError(f"the vocabulary share must be in (0, 1], not {share}")
    counts = torch.bincount(tokens.flatten().long(), minlength=vocab_size).double()
    order = counts.argsort(descending=True)
    covered = counts[order].cumsum(0) / counts.sum()
    kept = order[: int((covered < share).sum()) + 1]
    extra = torch.tensor([t for t in always if t is not None and 0 <= t < vocab_size], dtype=torch.long)
    return torch.unique(torch.cat([kept, extra]))


class TrimmedHead(nn.Module):
    """An LM head that scores only ``vocabulary``: logits over the full vocabulary, ``-inf`` elsewhere,
    at the cost of a ``len(vocabulary)``-row matrix product."""

    def __init__(self, head: nn.Linear, vocabulary: torch.Tensor):
        super().__init__()
        vocabulary = vocabulary.to(head.weight.device)
        self.vocab_size = head.weight.shape[0]
        self.register_buffer("vocabulary", vocabulary, persistent=False)
        self.weight = nn.Parameter(head.weight.detach().index_select(0, vocabulary).clone(), requires_grad=False)
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach()[vocabulary].clone(), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = F.linear(hidden, self.weight, self.bias)
        logits = scores.new_full((*scores.shape[:-1], self.vocab_size), float("-inf"))
        return logits.index_copy_(-1, self.vocabulary, scores)


def trim_vocabulary(model, vocabulary: torch.Tensor):
    """Give ``model`` (a draft) a head over ``vocabulary`` only, in place; returns ``model``."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"cannot trim an output layer of type {type(head).__name__}")
    model.set_output_embeddings(TrimmedHead(head, vocabulary))
    return model


def set_draft_length(generation_config, gamma: int, confidence_threshold: float = 0.0):
    """Set the draft length on a draft's ``generation_config`` (where assisted generation reads it), held
    constant; ``confidence_threshold`` 0 drafts all ``gamma`` tokens every round."""
    if gamma < 1:
        raise ValueError(f"gamma must be at least 1, not {gamma}")
    generation_config.num_assistant_tokens = int(gamma)
    generation_config.num_assistant_tokens_schedule = "constant"
    generation_config.assistant_confidence_threshold = float(confidence_threshold)
    return generation_config


def configure_draft(draft, gamma: int, confidence_threshold: float = 0.0):
    """``draft`` with its draft length set (see :func:`set_draft_length`)."""
    set_draft_length(draft.generation_config, gamma, confidence_threshold)
    return draft


# -- what a generate call accepted --------------------------------------------------------------------------


@dataclass
class AcceptanceCounts:
    """Rounds of assisted generation: tokens drafted and accepted in each."""

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.drafted)

    @property
    def alpha(self) -> float:
        """Per-token acceptance: accepted tokens over tokens the target judged (each round judges its
        accepted tokens and, when it stopped early, the first rejected one)."""
        judged = sum(a + (a < d) for a, d in zip(self.accepted, self.drafted))
        return sum(self.accepted) / judged if judged else float("nan")

    @property
    def tokens_per_call(self) -> float:
        """Tokens emitted per target forward pass (accepted ones plus the target's own)."""
        return (sum(self.accepted) + self.rounds) / self.rounds if self.rounds else float("nan")

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": sum(self.drafted), "accepted": sum(self.accepted),
                "alpha": self.alpha, "tokens_per_call": self.tokens_per_call}


# -- transformers' candidate-generator protocol ---------------------------------------------------------------
#
# ``transformers`` has no public hook for a candidate generator of one's own: ``generate`` builds it in
# ``GenerationMixin._get_candidate_generator`` and drives it from ``_assisted_decoding``. The two context
# managers below wrap the first; :func:`protocol_gaps` reads the second's source for every attribute it
# asks of a generator, so that a release that asks for more is refused with the missing names instead of
# failing with an AttributeError deep inside ``generate``.

# Read by ``_assisted_decoding`` only from its own ``AssistedCandidateGenerator`` classes, or only when a
# generator sets ``requires_model_outputs``: not asked of a plain ``CandidateGenerator``.
_ASSISTED_ONLY = frozenset({"assistant_model", "num_assistant_tokens", "model_kwargs_overrides"})


def _generation_internals():
    from transformers.generation.utils import GenerationMixin

    missing = [name for name in ("_get_candidate_generator", "_assisted_decoding") if not hasattr(GenerationMixin, name)]
    if missing:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__} has no GenerationMixin.{', '.join(missing)}: "
                           "bayesprune's acceptance counter and direct drafting need the assisted-generation "
                           "internals of transformers 5.17 to 5.25")
    return GenerationMixin


def protocol_reads() -> set[str]:
    """The attributes of its candidate generator that the installed ``transformers``' assisted decoding reads."""
    source = inspect.getsource(_generation_internals()._assisted_decoding)
    return set(re.findall(r"\bcandidate_generator\.(\w+)", source))


def protocol_gaps(generator_class: type) -> list[str]:
    """What ``generator_class`` lacks of the candidate-generator protocol of the installed ``transformers``
    (names a class must define itself, as methods, properties or class attributes)."""
    return sorted(name for name in protocol_reads() - _ASSISTED_ONLY if not hasattr(generator_class, name))


def check_protocol(generator_class: type) -> None:
    """Refuse, naming what is missing, a generator class the installed ``transformers`` cannot drive."""
    gaps = protocol_gaps(generator_class)
    if gaps:
        import transformers

        raise RuntimeError(f"transformers {transformers.__version__}'s assisted decoding reads "
                           f"{', '.join(gaps)} of a candidate generator, which {generator_class.__name__} does "
                           "not implement: use the locked stack (scripts/constraints.txt) or extend it")


@contextlib.contextmanager
def _candidate_generators(target, wrap):
    """Within the block, ``target.generate`` builds its candidate generator and passes it through ``wrap``."""
    _generation_internals()
    previous = target.__dict__.get("_get_candidate_generator")
    build = target._get_candidate_generator

    def wrapped(*args, **kwargs):
        return wrap(build(*args, **kwargs), *args, **kwargs)

    target._get_candidate_generator = wrapped
    try:
        yield
    finally:
        if previous is None:
            del target._get_candidate_generator
        else:
            target._get_candidate_generator = previous


@contextlib.contextmanager
def count_acceptance(target):
    """Count, for every round of ``target.generate(..., assistant_model=…)`` inside the block, how many
    tokens were drafted and how many the target accepted."""
    counts = AcceptanceCounts()

    def counting(generator, *args, **kwargs):
        update = generator.update_candidate_strategy

        def counted(input_ids, scores, num_matches):
            counts.drafted.append(int(scores.shape[1]) - 1)
            counts.accepted.append(int(num_matches))
            return update(input_ids, scores, num_matches)

        generator.update_candidate_strategy = counted
        return generator

    with _candidate_generators(target, counting):
        yield counts


class GreedyDraftCandidates(CandidateGenerator):
    """Greedy drafts from a plain forward loop over the draft's own KV cache.

    ``transformers`` drafts by calling the draft's ``generate`` once per round; on a
    small model on a CPU that call's set-up costs as much as a decoding step. This
    generator keeps the draft's cache between rounds, rolls it back to the prefix the
    target accepted, and drafts ``γ`` (the draft's ``num_assistant_tokens``) by argmax. It implements the
    whole protocol ``transformers``' assisted decoding asks of a generator (:func:`protocol_gaps`).
    """

    requires_model_outputs = False  # drafts from token ids alone, not from the target's hidden states

    def __init__(self, draft, max_length: int):
        from transformers import DynamicCache

        self.draft = draft
        self.gamma = int(draft.generation_config.num_assistant_tokens or 1)
        self.max_length = max_length
        self.cache = DynamicCache(config=draft.config)
        if hasattr(self.cache, "activate_past_recording"):
            self.cache.activate_past_recording()  # sliding-window layers must be able to roll back
        self.cached = None  # the token ids whose keys and values the cache holds

    def _common_prefix(self, input_ids: torch.Tensor) -> int:
        if self.cached is None:
            return 0
        n = min(self.cached.shape[1], input_ids.shape[1])
        differs = (self.cached[:, :n] != input_ids[:, :n]).any(0).nonzero()
        return int(differs[0]) if differs.numel() else n

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor, **kwargs):
        input_ids = input_ids.to(self.draft.device)
        steps = min(self.gamma, self.max_length - input_ids.shape[1] - 1)
        if steps <= 0:
            return input_ids, None
        keep = min(self._common_prefix(input_ids), input_ids.shape[1] - 1)
        if self.cached is not None and self.cached.shape[1] > keep:
            self.cache.crop(keep - self.cached.shape[1])
        sequence, new, scores = input_ids, input_ids[:, keep:], []
        cache = _with_cache(self.draft, self.cache)
        for _ in range(steps):
            logits = self.draft(new, **cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            new = logits.argmax(-1, keepdim=True)
            scores.append(logits)
            sequence = torch.cat([sequence, new], dim=1)
        self.cached = sequence[:, :-1]
        return sequence, torch.stack(scores, dim=1).float()

    @property
    def num_drafting_tokens(self) -> int:
        """Tokens drafted per round: how far the target's cache must be able to roll back."""
        return self.gamma

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        """The draft length stays what the draft's ``generation_config`` says."""


@contextlib.contextmanager
def direct_drafting(target):
    """Within the block, greedy ``target.generate(..., assistant_model=draft)`` drafts with
    :class:`GreedyDraftCandidates` instead of a ``generate`` call per round (same output, less
    overhead); sampling, and generation without an assistant, are left as they are."""
    check_protocol(GreedyDraftCandidates)

    def direct(generator, *args, **kwargs):
        generation_config = kwargs.get("generation_config", args[0] if args else None)
        draft = kwargs.get("assistant_model")
        if draft is None or generation_config.do_sample or type(generator) is not AssistedCandidateGenerator:
            return generator
        return GreedyDraftCandidates(draft, generation_config.max_length)

    with _candidate_generators(target, direct):
        yield

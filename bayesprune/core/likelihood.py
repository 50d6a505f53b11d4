"""What scores a network on a sequence: next-token NLL of the corpus, or distillation from the dense network.

The scorer functions here (per-token NLL, per-sequence NLL and KL) are the one place
every other part of the library (perplexity, depth search, routing, prediction,
baselines, recovery) scores text. The fit's two likelihoods both give one number per sequence (summed over its predicted tokens), entered as
``factor(−value)`` in the model's subsampled plate, so the prior and the cost (nats
per token) keep their meaning. Distillation scores ``KL(p_dense ‖ p_gated)`` per
predicted token (optionally mixed with the NLL): the gated network is fitted to
behave like the dense one, not to the corpus. Its teacher is the network with every
gate open (frozen weights, and adapter fits with the adapters off: the same weights,
one extra forward pass without gradients), or a frozen copy of the weights as they
were before the fit (jointly trained weights).
"""

from __future__ import annotations

import copy

import torch

from .adapters import adapters_disabled
from .config import LIKELIHOODS
from .gates import GatedModel



NLL_ROWS = 32  # logit rows scored at a time: their float32 copies stay in cache


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of every next token from the logits, in float32, ``(batch, seq_len − 1)``."""
    return _TokenNLL.apply(logits, input_ids[:, 1:])


class _TokenNLL(torch.autograd.Function):
    """Cross-entropy of each position's next token, ``logsumexp(z) − z[target]`` in float32, ``NLL_ROWS`` rows of
    logits at a time; its gradient, ``softmax(z) − onehot(target)``, made the same way in the logits' dtype.
    Casting the whole ``(batch, seq_len, vocabulary)`` logits to float32 for ``cross_entropy`` made and read
    several float32 copies of them per step, a pass through memory each."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, positions = targets.shape
        lse = torch.empty(batch, positions, dtype=torch.float32, device=logits.device)
        for b in range(batch):
            for start in range(0, positions, NLL_ROWS):
                rows = slice(start, min(start + NLL_ROWS, positions))
                lse[b, rows] = logits[b, rows].float().logsumexp(-1)
        picked = logits[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
        ctx.save_for_backward(logits, targets, lse)
        return lse - picked

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        out = torch.zeros_like(logits)  # the last position predicts nothing
        batch, positions = targets.shape
        for b in range(batch):
            for start in range(0, positions, NLL_ROWS):
                rows = slice(start, min(start + NLL_ROWS, positions))
                part = logits[b, rows].float().sub_(lse[b, rows, None]).exp_()
                part.scatter_add_(-1, targets[b, rows, None], part.new_full((part.shape[0], 1), -1.0))
                out[b, rows] = part.mul_(grad[b, rows, None])
        return out, None


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each sequence from its logits, shape ``(batch,)``."""
    return token_nll(logits, input_ids).sum(-1)


def sequence_nll(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood of each sequence under ``model``, shape ``(batch,)``."""
    input_ids = input_ids.to(next(model.parameters()).device)
    return next_token_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)


@torch.no_grad()
def calibration_nll(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood over a few token windows, in mini-batches."""
    total = sum(sequence_nll(model, windows[i:i + batch_size]).sum().item()
                for i in range(0, windows.shape[0], batch_size))
    return total / (windows.shape[0] * (windows.shape[1] - 1))


def next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every predicted position (all but the last), in float32."""
    return logits[:, :-1].float().log_softmax(-1)


def sequence_kl(teacher_log_probs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``Σ_t KL(p_teacher ‖ p_student)`` per sequence, from the teacher's log-probabilities and the student's logits."""
    return (teacher_log_probs.exp() * (teacher_log_probs - next_token_log_probs(logits))).sum((-1, -2))


class NextTokenLikelihood:
    """``NLL(sequence | gates)``: the corpus as the data."""

    def __call__(self, gated: GatedModel, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the value the plate's factor subtracts, the NLL), each summed per sequence."""
        nll = sequence_nll(gated, sequences)
        return nll, nll


class DistillationLikelihood:
    """``(1 − w) · KL(p_teacher ‖ p_gated) + w · NLL``, summed over a sequence's predicted tokens."""

    def __init__(self, teacher, nll_weight: float = 0.0):
        if not 0 <= nll_weight <= 1:
            raise ValueError(f"the NLL weight of a distillation likelihood must be in [0, 1], not {nll_weight}")
        self.teacher = teacher
        self.nll_weight = nll_weight

    def __call__(self, gated: GatedModel, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher = next_token_log_probs(self.teacher(sequences))
        logits = gated(input_ids=sequences, use_cache=False).logits
        kl = sequence_kl(teacher, logits)
        nll = next_token_nll(logits, sequences)
        return (1 - self.nll_weight) * kl + self.nll_weight * nll, nll


class OpenGatesTeacher:
    """The gated network itself with every gate open and its adapters (if any) off: the dense network
    while its weights are frozen."""

    def __init__(self, gated: GatedModel):
        self.gated = gated
        self.open = {k: None for k in gated.kinds}

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        with self.gated.gates_set(self.open, self.open), adapters_disabled(self.gated.model):
            return self.gated(input_ids=sequences, use_cache=False).logits


class NetworkTeacher:
    """A network of its own, frozen: a copy of the weights as they were before a fit that trains them, or the
    dense network a cut model is fine-tuned towards."""

    def __init__(self, model):
        self.model = model.requires_grad_(False).eval()

    @classmethod
    def frozen_copy(cls, gated: GatedModel) -> "NetworkTeacher":
        """A frozen copy of the gated network's weights as they are now."""
        with gated.unwrapped() as model:
            return cls(copy.deepcopy(model))

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=sequences, use_cache=False).logits


def likelihood_for(gated: GatedModel, kind: str = "nll", nll_weight: float = 0.0, weights: str = "frozen"):
    """The likelihood a fit scores sequences with; call it before any weight is trained."""
    if kind == "nll":
        return NextTokenLikelihood()
    if kind == "distillation":
        teacher = NetworkTeacher.frozen_copy(gated) if weights == "joint" else OpenGatesTeacher(gated)
        return DistillationLikelihood(teacher, nll_weight)
    raise ValueError(f"the likelihood must be one of {LIKELIHOODS}, not {kind!r}")

"""What a distillation teacher costs: the open-gate network, a frozen copy, or a top-k cache of its log-probabilities.

A distillation fit scores ``KL(p_teacher ‖ p_gated)`` at every step. The teacher can be
the gated network with its gates open (frozen weights, and adapter fits with the
adapters off: bayesprune's choice), a frozen copy of the weights (jointly trained
weights: bayesprune's choice), or a cache of its top-k log-probabilities per position,
computed once for the windows the fit visits and read back at each step. With the
cache, the KL is that of the two distributions coarsened to the k cached tokens plus
one bucket for the rest: a lower bound on the full KL.

Measured on the default model (fp32, one process, 2 threads, 4 × 128-token windows,
medians of ``--rounds``): a fit step's student forward and backward (NLL, frozen
weights), each teacher's forward, building the cache (the forward plus ``topk``) and
the KL from it, the memory each holds, and how far the top-k KL is from the full KL
with 3 middle blocks gated off. The windows a 300-step default fit visits are counted
from its own seeded draws, to say what a cache would have to hold and when it pays.

    .venv/bin/python bench/teacher.py      # ≈ 3 min; bench/results/teacher.json
"""

from __future__ import annotations

import argparse
import platform

import pyro
import torch
from common import median_seconds, write_results

import bayesprune as bp
from bayesprune.core.config import CostConfig
from bayesprune.core.fit import draw_cost, step_seed
from bayesprune.core.likelihood import (NetworkTeacher, OpenGatesTeacher, next_token_log_probs, sequence_kl,
                                  sequence_nll)

KS = (16, 64, 256)


def top_k(log_probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache of one batch: the k largest log-probabilities per position (float16) and their token ids."""
    values, ids = log_probs.topk(k, dim=-1)
    return values.half(), ids.int()


def coarse_kl(values: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per sequence, ``Σ_t KL`` of the teacher and student distributions over the cached tokens plus the rest."""
    p = values.float().exp()
    log_q = next_token_log_probs(logits).gather(-1, ids.long())
    p_rest = (1 - p.sum(-1)).clamp_min(1e-12)
    q_rest = (1 - log_q.exp().sum(-1)).clamp_min(1e-12)
    kl = (p * (values.float() - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())
    return kl.sum(-1)


def visited_windows(num_windows: int, steps: int = 300, batch_size: int = 4, seed: int = 0) -> int:
    """How many distinct windows a fit with these settings draws (the fit's own seeded draws)."""
    seen = set()
    for step in range(steps):
        pyro.set_rng_seed(step_seed(seed, step))
        draw_cost(CostConfig())
        seen.update(torch.randperm(num_windows)[:batch_size].tolist())
    return len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/teacher.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = bp.load_model()
    fit_windows = bp.windows(bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))["fit"], 128)
    batch = fit_windows[torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))[:4]]
    gated = bp.gate(model, bp.GateConfig(units=("block",)))
    open_gates, frozen_copy = OpenGatesTeacher(gated), NetworkTeacher.frozen_copy(gated)

    model.requires_grad_(False)  # frozen weights: the backward reaches the gates only

    def student_step():
        with torch.enable_grad(), gated.gates_set({"block": torch.ones(gated.num_layers).requires_grad_()}):
            sequence_nll(gated, batch).sum().backward()

    with torch.no_grad():
        teacher_log_probs = next_token_log_probs(open_gates(batch))
        skip = torch.ones(gated.num_layers)
        skip[[12, 13, 14]] = 0
        with gated.gates_set({"block": skip}):
            student_logits = gated(input_ids=batch, use_cache=False).logits
    full_kl = sequence_kl(teacher_log_probs, student_logits)
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    with torch.no_grad():
        seconds = {
            "student forward + backward (NLL step)": median_seconds(student_step, args.rounds),
            "open-gate teacher forward": median_seconds(lambda: open_gates(batch), args.rounds),
            "frozen-copy teacher forward": median_seconds(lambda: frozen_copy(batch), args.rounds),
            "full KL from teacher log-probabilities": median_seconds(
                lambda: sequence_kl(teacher_log_probs, student_logits), args.rounds),
        }
        cache = {}
        for k in KS:
            seconds[f"build top-{k} cache (forward + topk)"] = median_seconds(
                lambda: top_k(next_token_log_probs(open_gates(batch)), k), args.rounds)
            values, ids = top_k(teacher_log_probs, k)
            seconds[f"top-{k} KL from the cache"] = median_seconds(lambda: coarse_kl(values, ids, student_logits),
                                                                   args.rounds)
            approx = coarse_kl(values, ids, student_logits)
            cache[k] = {"bytes_per_window": (values.numel() * 2 + ids.numel() * 4) // batch.shape[0],
                        "kl_per_token": float(approx.sum() / tokens),
                        "ratio_to_full_kl": float(approx.sum() / full_kl.sum()),
                        "teacher_mass_cached": float(values.float().exp().sum(-1).mean())}
    gated.remove()
    visited = visited_windows(fit_windows.shape[0])
    weights_bytes = sum(p.numel() * p.element_size() for p in frozen_copy.model.parameters())
    teacher = seconds["open-gate teacher forward"]
    per_fit = {"on the fly (open gates or frozen copy), every fit": 300 * teacher,
               **{f"top-{k} cache: the first fit builds it": visited / batch.shape[0]
                  * seconds[f"build top-{k} cache (forward + topk)"]
                  + 300 * seconds[f"top-{k} KL from the cache"] for k in KS},
               **{f"top-{k} cache: each later fit on the same windows": 300 * seconds[f"top-{k} KL from the cache"]
                  for k in KS}}
    result = {
        "how": f"one process, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
               f"default model in float32; 4 × 128-token fit windows; medians of {args.rounds} rounds; the KL check "
               f"gates blocks 12, 13 and 14 off",
        "seconds_per_batch": seconds,
        "full_kl_per_token": float(full_kl.sum() / tokens),
        "top_k": cache,
        "fit_windows": fit_windows.shape[0], "windows_a_300_step_fit_visits": visited,
        "frozen_copy_bytes": weights_bytes,
        "teacher_seconds_per_300_step_fit": per_fit,
        "torch": torch.__version__, "machine": platform.platform(),
    }
    write_results(result, args.out)
    for name, value in {**seconds, **per_fit}.items():
        print(f"{name:<60} {value:8.3f} s")
    for k, row in cache.items():
        print(f"top-{k}: {row}")


if __name__ == "__main__":
    main()

"""Per-step cost of the Pyro machinery over a plain PyTorch step of the same gated model.

Both steps draw straight-through relaxed Bernoulli block gates, run the same forward
and backward through the frozen network, add the same cost term and take an Adam
step with global-norm clipping. The Pyro step adds the hierarchical prior, the
AutoNormal guide and Trace_ELBO. Steps alternate (plain, Pyro, plain, …) so that
both see the same machine load; the ratio of medians is reported.

    .venv/bin/python bench/step_overhead.py             # SmolLM2-135M, 4 × 128 tokens
    .venv/bin/python bench/step_overhead.py --tiny      # smoke run on a tiny random Llama
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from transformers import AutoModelForCausalLM, LlamaConfig

import bayesprune as bp
from bayesprune.evaluate import sequence_nll
from bayesprune.fit import make_guide
from bayesprune.model import PruningModel, kept_fraction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/step_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = bp.load_model()
    if args.tiny:
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2)).eval()
    sequences = bp.windows(bp.load_splits(tokenizer, bp.DataConfig())["fit"], args.seq_len)
    gated = bp.gate(model, bp.GateConfig(units=["block"]))
    for p in gated.parameters():
        p.requires_grad_(False)
    prior = bp.PriorConfig()
    pruning = PruningModel(gated, sequences, prior)
    generator = torch.Generator().manual_seed(0)
    batch = lambda: torch.randint(0, sequences.shape[0], (args.batch_size,), generator=generator)  # noqa: E731

    pyro.clear_param_store()
    guide = make_guide(pruning)
    loss_fn = Trace_ELBO().differentiable_loss
    loss_fn(pruning, guide, batch())
    pyro_params = list(guide.parameters())
    pyro_opt = torch.optim.Adam(pyro_params, lr=0.05)

    logits = torch.full((gated.num_layers,), prior.mean_logit_loc, requires_grad=True)
    plain_opt = torch.optim.Adam([logits], lr=0.05)

    def pyro_step():
        loss = loss_fn(pruning, guide, batch()) / pruning.num_tokens
        pyro_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(pyro_params, 1.0)
        pyro_opt.step()

    def plain_step():
        z = dist.RelaxedBernoulliStraightThrough(torch.tensor(prior.temperature), logits=logits).rsample()
        gated.set_gates({"block": z})
        ids = sequences[batch()]
        loss = sequence_nll(gated, ids).sum() / (ids.shape[0] * (ids.shape[1] - 1))
        loss = loss + prior.cost * kept_fraction({"block": z.double()}, pruning.sizes).float()
        plain_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([logits], 1.0)
        plain_opt.step()

    times = {"plain": [], "pyro": []}
    for round_ in range(args.rounds + 2):
        for name, step in (("plain", plain_step), ("pyro", pyro_step)):
            start = time.perf_counter()
            step()
            if round_ >= 2:  # the first two rounds warm up
                times[name].append(time.perf_counter() - start)

    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "seconds per SVI step, frozen weights, block gates",
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
        "batch": [args.batch_size, args.seq_len], "threads": args.threads, "rounds": args.rounds,
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__},
        "median_seconds": median, "all_seconds": times,
        "pyro_over_plain": median["pyro"] / median["plain"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "median_seconds", "pyro_over_plain")}, indent=2))


if __name__ == "__main__":
    main()

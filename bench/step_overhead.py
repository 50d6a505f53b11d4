"""Per-step cost of the Pyro machinery over a plain PyTorch step of the same cost-conditioned gates.

Both steps draw a cost (the fit's mixture), a mini-batch and straight-through gates
from the cost-conditioned inclusion probabilities of every head group and neuron, run
the same forward and backward through the frozen network, add the expected-size cost
term and take an AdamW step with global-norm clipping. The plain step is the shape of
the earlier plain-PyTorch amortised fit: point estimates of the inclusion parameters
under a normal log-prior, no Pyro. The Pyro step is ``bayesprune.core.fit``'s: ``Trace_ELBO()(model, guide)`` over the
hierarchical prior and the mean-field guide, with every parameter drawn from the guide.
Steps alternate (plain, Pyro, plain, …) on the same mini-batch and cost, so that both
see the same machine load and the same work; the ratio of medians is reported.

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
import torch
from pyro.infer import Trace_ELBO
from transformers import AutoModelForCausalLM, LlamaConfig

import bayesprune as bp
from bayesprune.core import inclusion
from bayesprune.core.likelihood import sequence_nll
from bayesprune.core.fit import draw_cost, make_optimizer
from bayesprune.core.guide import CostConditionedGuide
from bayesprune.core.model import PruningModel


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
    sequences = bp.windows(bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))["fit"], args.seq_len)
    gated = bp.gate(model, bp.GateConfig(units=["head", "neuron"]))
    for p in gated.parameters():
        p.requires_grad_(False)
    config, costs = bp.FitConfig(), bp.CostConfig()
    pruning = PruningModel(gated, sequences, bp.PriorConfig())
    generator = torch.Generator().manual_seed(0)

    def batch():
        return torch.randint(0, sequences.shape[0], (args.batch_size,), generator=generator)

    pyro.clear_param_store()
    guide = CostConditionedGuide(pruning.prior, config.guide_init_scale)
    elbo = Trace_ELBO()(pruning, guide)
    pyro_opt = make_optimizer(list(guide.parameters()), config.guide_lr, [], config)

    theta = {s.name: (s.start.log() if s.positive else s.start).clone().requires_grad_() for s in guide.sites}
    plain_opt = make_optimizer(list(theta.values()), config.guide_lr, [], config)

    def pyro_step(ids, cost):
        loss = elbo(ids, cost) / pruning.num_tokens
        pyro_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(guide.parameters()), config.clip_norm)
        pyro_opt.step()

    def plain_step(ids, cost):
        p = inclusion.probabilities(theta, pruning.importance, cost, pruning.prior.config)
        gates = {k: v + (torch.bernoulli(v.detach()) - v).detach() for k, v in p.items()}
        ids = sequences[ids]
        with gated.gates_set(gates, inclusion.amplitudes(theta, pruning.importance, cost)):
            loss = sequence_nll(gated, ids).sum() / (ids.shape[0] * (ids.shape[1] - 1))
        log_prior = -sum(v.pow(2).sum() / 2 for v in theta.values())  # point estimates under a normal prior
        loss = loss + cost * pruning.sizes.kept_fraction(p).float() - log_prior / pruning.num_tokens
        plain_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(theta.values()), config.clip_norm)
        plain_opt.step()

    times = {"plain": [], "pyro": []}
    torch.manual_seed(0)
    for round_ in range(args.rounds + 2):
        ids, cost = batch(), draw_cost(costs)  # the same mini-batch and cost for both
        for name, step in (("plain", plain_step), ("pyro", pyro_step)):
            start = time.perf_counter()
            step(ids, cost)
            if round_ >= 2:  # the first two rounds warm up
                times[name].append(time.perf_counter() - start)

    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "seconds per fit step, frozen weights, head-group and neuron gates, a cost drawn per step",
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
        "batch": [args.batch_size, args.seq_len], "threads": args.threads, "rounds": args.rounds,
        "sites": len(guide.sites),
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "pyro": pyro.__version__},
        "median_seconds": median, "all_seconds": times,
        "pyro_over_plain": median["pyro"] / median["plain"],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "median_seconds", "pyro_over_plain")}, indent=2))


if __name__ == "__main__":
    main()

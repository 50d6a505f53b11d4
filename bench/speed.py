"""CPU speed of extracted models vs dense, as ratios to the FLOP-ideal speed-up.

For each model: prefill latency of 256 tokens at batch 1 and 8 (no cache), and
greedy decode tokens/s at batch 1 (16-token prompt, 64 new tokens, KV cache).
Models are timed round-robin (dense, then each extracted model, repeated) so all
see the same machine load; medians are reported. The FLOP-ideal speed-up counts
multiply-adds of every linear layer and the LM head plus attention scores and
mixing over the context; ``efficiency`` = measured speed-up / ideal speed-up
(1.0 = the kernels keep pace with the FLOPs removed).

Baselines (``--baselines``) are timed in the same rounds: ShortGPT stands for every
block-removal method (SLEB, random and drop-last give the same shapes at a size),
magnitude for uniform head/neuron removal, and Wanda (unstructured and 2:4) for
the unstructured methods, whose pruned weights keep their dense shapes and run
on the same dense kernels (SparseGPT's output has the same shapes as Wanda's).

    .venv/bin/python bench/speed.py --runs runs/depth runs/width runs/joint --target 0.5 --baselines
    .venv/bin/python bench/speed.py --tiny          # smoke run on a tiny random Llama
    .venv/bin/python bench/speed.py --runs runs/default --target 0.5 --bf16 --out bench/results/speed-bf16.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
from pathlib import Path

import torch
from common import median_seconds, pyplot, save_figure, write_results

import bayesprune as bp
from bayesprune.core.architectures import decoder_layers
from bayesprune.baselines import baseline_plan, block_influence, magnitude_plan, prune_unstructured, sparsity_for
from bayesprune.inputs.pruned import SkippedAttention
from bayesprune.run.rundir import RunDir


def flops_per_token(model, context: float) -> float:
    """Multiply-adds × 2 per token at an average attended context length."""
    total = 2.0 * model.get_output_embeddings().weight.numel()
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for block in decoder_layers(model):
        total += 2.0 * sum(p.numel() for p in block.parameters() if p.dim() == 2)
        attention = getattr(block, "self_attn", None)
        if attention is not None and not isinstance(attention, SkippedAttention):
            query_heads = attention.o_proj.weight.shape[1] // head_dim
            total += 2.0 * 2 * query_heads * head_dim * context
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["runs/depth", "runs/width", "runs/joint"])
    parser.add_argument("--target", default="0.5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--baselines", action="store_true", help="also time ShortGPT, magnitude and Wanda outputs")
    parser.add_argument("--bf16", action="store_true", help="also time every model with bf16 weights")
    parser.add_argument("--out", default="bench/results/speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefill, prompt, new = (256, 16, 64) if not args.tiny else (32, 4, 8)
    if args.tiny:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        dense = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2)).eval()
        gated = bp.gate(dense, bp.GateConfig(units=("block", "head", "neuron")))
        posteriors = {"tiny": bp.fit(gated, torch.randint(0, 320, (8, 16)), bp.FitConfig(steps=2, batch_size=2),
                                     progress=False).posterior(50)}
        gated.remove()
    else:
        dense, tokenizer = bp.load_model()
        posteriors = {Path(run).name: bp.GatePosterior.load(Path(run) / RunDir.POSTERIOR) for run in args.runs}
    models = {"dense": dense}
    for name, posterior in posteriors.items():
        widths = bool(posterior.units)
        variants = [("per-layer", 1)] + ([("per-layer", 64), ("uniform", 1)] if widths else [])
        for form, multiple in variants:
            small, plan = bp.extract(dense, posterior, args.target, form, multiple)
            models[f"{name} {form}" + (f" ×{multiple}" if multiple > 1 else "")] = small
    if args.baselines:
        models.update(baseline_models(dense, args.target, calibration_windows(dense, None if args.tiny else tokenizer)))
    if args.bf16:  # the same models with bf16 weights; speed-ups stay relative to the float32 dense model
        models.update({f"{name} bf16": copy.deepcopy(m).to(torch.bfloat16) for name, m in list(models.items())})
    vocab = dense.config.vocab_size
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(0, vocab, (b, prefill), generator=g) for b in (1, 8)}
    start = torch.randint(0, vocab, (1, prompt), generator=g)

    def prefill_fn(m, b):
        return lambda: m(input_ids=inputs[b], use_cache=False)

    def decode_fn(m):
        return lambda: m.generate(start, max_new_tokens=new, min_new_tokens=new, do_sample=False)

    samples = {name: {"prefill_b1": [], "prefill_b8": [], "decode": []} for name in models}
    with torch.no_grad():
        for name, m in models.items():  # warm-up
            prefill_fn(m, 1)()
            decode_fn(m)()
        for round_ in range(args.rounds):
            for name, m in models.items():
                samples[name]["prefill_b1"].append(median_seconds(prefill_fn(m, 1), 1))
                samples[name]["prefill_b8"].append(median_seconds(prefill_fn(m, 8), 1))
                samples[name]["decode"].append(median_seconds(decode_fn(m), 1))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    rows = []
    base = {k: statistics.median(v) for k, v in samples["dense"].items()}
    for name, m in models.items():
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        ideal_prefill = flops_per_token(dense, (prefill + 1) / 2) / flops_per_token(m, (prefill + 1) / 2)
        ideal_decode = flops_per_token(dense, prompt + new / 2) / flops_per_token(m, prompt + new / 2)
        row = {"model": name, "parameters": bp.model_size(m)["parameters"],
               "prefill_b1_s": med["prefill_b1"], "prefill_b8_s": med["prefill_b8"],
               "decode_tokens_per_s": new / med["decode"],
               "ideal_prefill_speedup": ideal_prefill, "ideal_decode_speedup": ideal_decode}
        for key, ideal in (("prefill_b1", ideal_prefill), ("prefill_b8", ideal_prefill), ("decode", ideal_decode)):
            row[f"{key}_speedup"] = base[key] / med[key]
            row[f"{key}_efficiency"] = row[f"{key}_speedup"] / ideal
        rows.append(row)
        print(f"{name:<24} prefill b1 {med['prefill_b1'] * 1e3:7.1f} ms  b8 {med['prefill_b8'] * 1e3:8.1f} ms  "
              f"decode {row['decode_tokens_per_s']:6.1f} tok/s  speed-up b1 {row['prefill_b1_speedup']:.2f} "
              f"b8 {row['prefill_b8_speedup']:.2f} decode {row['decode_speedup']:.2f}  ideal "
              f"{ideal_prefill:.2f}/{ideal_decode:.2f}")
    result = {"rows": rows, "target": args.target, "threads": args.threads, "rounds": args.rounds,
              "prefill_tokens": prefill, "decode": {"prompt": prompt, "new_tokens": new},
              "machine": platform.platform(), "processor": platform.processor(), "torch": torch.__version__}
    write_results(result, args.out, plot)


def calibration_windows(dense, tokenizer) -> torch.Tensor:
    """8 × 128 seeded fit-split windows of the default corpus (random tokens without a tokenizer)."""
    if tokenizer is None:
        return torch.randint(0, dense.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    fit_windows = bp.windows(bp.load_splits(tokenizer, bp.DataConfig(path="shakespeare"))["fit"], 128)
    return fit_windows[torch.randperm(fit_windows.shape[0], generator=torch.Generator().manual_seed(0))[:8]]


def baseline_models(dense, target: str, calibration: torch.Tensor) -> dict:
    """Each baseline's output at ``target``."""
    models = {"shortgpt (block)": bp.extract_model(dense, baseline_plan(dense, block_influence(dense, calibration),
                                                                        target)),
              "magnitude uniform": bp.extract_model(dense, magnitude_plan(dense, target))}
    for label, pattern in (("wanda unstructured", None), ("wanda 2:4", (2, 4))):
        pruned = copy.deepcopy(dense)
        prune_unstructured(pruned, calibration, "wanda", sparsity_for(pruned, float(target)), pattern, progress=False)
        models[label] = pruned
    return models


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    import numpy as np

    names = [r["model"] for r in rows]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 4))
    for offset, key, label in ((-0.3, "prefill_b1_speedup", "prefill b1"), (-0.1, "prefill_b8_speedup", "prefill b8"),
                               (0.1, "decode_speedup", "decode"), (0.3, "ideal_prefill_speedup", "FLOP ideal")):
        ax.bar(x + offset, [r[key] for r in rows], width=0.2, label=label)
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.axhline(1, color="k", lw=0.5)
    ax.set(ylabel="speed-up over dense", title="CPU speed-up of extracted models (measured vs FLOP ideal)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main()

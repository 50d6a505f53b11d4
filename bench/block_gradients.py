"""Block-gate gradients in bfloat16 against float32, and both against what removing each block does.

The fits' block gates are drawn straight through: a gate's gradient is the slope of the
NLL in that gate at the drawn value. This measures, with every gate open on fit windows
of each domain, (a) whether bfloat16 gives float32's slopes, and (b) how well either
ranks blocks by the NLL rise when each is removed alone (leave-one-out, float32). A block
whose slope is positive looks removable to a straight-through fit however much its
removal costs.

    .venv/bin/python bench/block_gradients.py         # ≈ 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from common import write_results

import bayesprune as bp
from bayesprune.inputs.data import domain_documents
from bayesprune.core.likelihood import sequence_nll
from bayesprune.core.removal import removal_scores


def per_token_nll(gated, windows: torch.Tensor) -> torch.Tensor:
    return sequence_nll(gated, windows).sum() / (windows.numel() - windows.shape[0])


def open_gate_slopes(gated, windows: torch.Tensor) -> torch.Tensor:
    """d NLL per token / d z for every block gate, all gates at 1."""
    z = torch.ones(gated.num_layers, requires_grad=True)
    with gated.gates_set({"block": z}):
        per_token_nll(gated, windows).backward()
    return z.grad.detach().clone()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", nargs="+", default=["shakespeare", "kjv"])
    parser.add_argument("--windows", type=int, default=8, help="fit windows of 128 tokens per domain")
    parser.add_argument("--out", default="bench/results/block_gradients.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.time()
    slopes, rises = {}, {}
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = bp.load_model(dtype=dtype)
        gated = bp.gate(model, bp.GateConfig(units=("block",)))
        for domain in args.domains:
            tokens = bp.tokenize(tokenizer, bp.inputs.data.split_documents(domain_documents(domain))["fit"])
            windows = bp.windows(tokens, 128)[:args.windows]
            slopes[dtype, domain] = open_gate_slopes(gated, windows)
            if dtype == "float32":
                rises[domain] = removal_scores(gated, windows, batch_size=windows.shape[0])
    rows = []
    for domain in args.domains:
        f32, b16, rise = slopes["float32", domain], slopes["bfloat16", domain], rises[domain]
        rows.append({"domain": domain, "slope_float32": f32.tolist(), "slope_bfloat16": b16.tolist(),
                     "removal_rise_float32": rise.tolist(),
                     "pearson_bfloat16_float32": float(torch.corrcoef(torch.stack([f32, b16]))[0, 1]),
                     "same_sign": int((f32.sign() == b16.sign()).sum()),
                     # a removable block has a positive slope and a small rise: rank −slope against the rise
                     "spearman_minus_slope_vs_rise_float32": spearman(-f32, rise),
                     "spearman_minus_slope_vs_rise_bfloat16": spearman(-b16, rise),
                     "positive_slope_blocks": [b for b in range(len(f32)) if f32[b] > 0]})
    result = {"how": {"command": "bench/block_gradients.py " + " ".join(args.domains), "windows": args.windows,
                      "window_tokens": 128, "threads": torch.get_num_threads(),
                      "machine": platform.processor() or platform.machine(),
                      "seconds": round(time.time() - started)}, "rows": rows}
    write_results(result, args.out)


if __name__ == "__main__":
    main()

"""Memory and time of the next-token NLL and its gradient: ``cross_entropy`` on a float32 copy of every logit
against :func:`bayesprune.core.likelihood.token_nll` (float32 a few rows at a time).

Each (method, shape) runs in a process of its own: bfloat16 logits of SmolLM2's vocabulary are made, then one
forward and backward; the process's peak resident memory above what it held before, and the seconds of that
pass (the first: pages are faulted in as a fit's first step faults them). Rounds alternate the methods.

    .venv/bin/python bench/nll_memory.py          # 4 × 128 (the default fit's step) and 8 × 512 tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("whole", "chunked")
VOCABULARY = 49152


def child(method: str, batch: int, length: int, threads: int) -> dict:
    import torch

    from bayesprune.core.likelihood import token_nll
    from fit_speed import whole_logits_nll

    torch.set_num_threads(threads)
    logits = torch.randn(batch, length, VOCABULARY, dtype=torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, VOCABULARY, (batch, length))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    (whole_logits_nll if method == "whole" else token_nll)(logits, ids).sum().backward()
    seconds = time.perf_counter() - started
    return {"method": method, "batch": batch, "length": length, "seconds": seconds,
            "peak_above_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            "logits_mib": logits.numel() * 2 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4x128", "8x512"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/nll_memory.json")
    args = parser.parse_args()
    if args.child:
        batch, length = map(int, args.shape.split("x"))
        print(json.dumps(child(args.child, batch, length, args.threads)))
        return

    from common import write_results

    started, runs = time.time(), []
    for round_ in range(args.rounds):
        for shape in args.shapes:
            for method in METHODS:
                command = [sys.executable, __file__, "--child", method, "--shape", shape, "--threads", str(args.threads)]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                runs.append({"round": round_, **json.loads(out.strip().splitlines()[-1])})
                print(runs[-1], flush=True)
    summary = {shape: {method: {key: statistics.median(r[key] for r in runs if r["method"] == method
                                                       and f"{r['batch']}x{r['length']}" == shape)
                                for key in ("seconds", "peak_above_mib", "logits_mib")} for method in METHODS}
               for shape in args.shapes}
    write_results({"benchmark": "nll_memory", "vocabulary": VOCABULARY, "threads": args.threads,
                   "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
                   "how": "one process per (method, shape); one forward and backward of bfloat16 logits; peak "
                          "resident memory above the process's before it, medians over rounds",
                   "wall_seconds": time.time() - started, "summary": summary, "runs": runs}, args.out)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()

"""Seconds of the removal engine's trials run from the first changed layer on, against each a whole pass.

Every trial of ``bayesprune.core.removal`` (a group of units or a set of blocks removed) leaves the layers before
the first one it changes as in the dense pass; the engine replays their recorded outputs
(:class:`bayesprune.core.removal.DensePrefix`) and computes only the rest. Timed in one process, alternating with
``whole`` (every trial a whole forward pass, as before), ``--rounds`` times each, on SmolLM2-135M in bfloat16:

* ``scan``: the critical-unit scan a default fit starts with (``critical_units``: head groups and FFN neurons,
  four seeded 128-token windows of the default corpus's fit split, the fit's threshold);
* ``depth``: the conditional depth search at SLEB's budget (``conditional_depth_search``, NLL, the 8 windows SLEB
  calibrates on, 15 blocks removed: ``depth_search.py``'s ``nll-bf16-8``).

Both ways must give the same units and the same removal order.

    .venv/bin/python bench/removal_speed.py          # ≈ 12 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import default_model_and_corpora, write_results

import bayesprune as bp
from bayesprune.core import removal
from bayesprune.run.fit_job import fit_dtype

WAYS = ("replayed", "whole")


def whole_pass(self, layer: int) -> torch.Tensor:
    """``DensePrefix.logits_from`` without the replay: every layer computed."""
    return self.gated(input_ids=self.batch, use_cache=False).logits


def timed(way: str, call) -> tuple[float, object]:
    replay = removal.DensePrefix.logits_from
    removal.DensePrefix.logits_from = replay if way == "replayed" else whole_pass
    try:
        started = time.perf_counter()
        out = call()
        return time.perf_counter() - started, out
    finally:
        removal.DensePrefix.logits_from = replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/removal_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bp.RunConfig()
    model, corpora, shuffled = default_model_and_corpora()
    model = model.to(fit_dtype(config.fit, "cpu"))
    _, tokenizer = bp.load_model()
    sequences = bp.windows(bp.load_splits(tokenizer, config.data)["fit"], config.fit.seq_len)
    scan_windows = sequences[torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(0))[:4]]
    tasks = {
        "scan": (config.gate, lambda gated: removal.critical_units(gated, scan_windows, config.fit.critical_nll),
                 lambda found: {k: v.nonzero().tolist() for k, v in found.items()}),
        "depth": (bp.GateConfig(units=("block",)),
                  lambda gated: removal.conditional_depth_search(gated, shuffled[:8], 15, "nll", progress=False),
                  lambda search: search.order),
    }
    result = {"tasks": {}, "dtype": str(model.dtype).removeprefix("torch."), "threads": args.threads,
              "how": "one process, the two ways alternating; median over rounds", "machine": platform.platform(),
              "processor": platform.processor(), "torch": torch.__version__}
    for task, (gates, call, outcome) in tasks.items():
        gated = bp.gate(model, gates)
        seconds, outcomes = {way: [] for way in WAYS}, {}
        for _ in range(args.rounds):
            for way in WAYS:
                spent, out = timed(way, lambda: call(gated))
                seconds[way].append(spent)
                outcomes[way] = outcome(out)
                print(f"{task} {way}: {spent:.1f} s", flush=True)
        gated.remove()
        median = {way: statistics.median(values) for way, values in seconds.items()}
        result["tasks"][task] = {"seconds": seconds, "median_seconds": median,
                                 "speed_up": median["whole"] / median["replayed"],
                                 "same_outcome": outcomes["replayed"] == outcomes["whole"],
                                 "outcome": outcomes["replayed"]}
        print(f"{task}: whole {median['whole']:.1f} s, replayed {median['replayed']:.1f} s, "
              f"{result['tasks'][task]['speed_up']:.2f}x; the same outcome: {result['tasks'][task]['same_outcome']}")
    write_results(result, args.out)


if __name__ == "__main__":
    main()

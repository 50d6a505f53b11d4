"""Seconds of the critical-unit scan a fit starts with: each trial from its layer on, against every trial a whole pass.

The default fit's scan (``bayesprune.core.removal.critical_units``: SmolLM2-135M in its fit dtype, head groups
and FFN neurons, four seeded 128-token windows of the default corpus's fit split, the fit's threshold), timed
``--rounds`` times each way in one process, alternating: ``replayed``, as the library runs it (the layers before
the changed one return their recorded outputs, :class:`bayesprune.core.removal.DensePrefix`), and ``whole``, every
trial a whole forward pass (what the scan did before). Both must find the same units.

    .venv/bin/python bench/scan_speed.py          # ≈ 4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from common import write_results

import bayesprune as bp
from bayesprune.core import removal
from bayesprune.run.fit_job import fit_dtype


def whole_pass(self, layer: int) -> torch.Tensor:
    """``DensePrefix.logits_from`` without the replay: every layer computed."""
    return self.gated(input_ids=self.batch, use_cache=False).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/scan_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = bp.RunConfig()
    model, tokenizer = bp.load_model()
    model = model.to(fit_dtype(config.fit, "cpu"))
    sequences = bp.windows(bp.load_splits(tokenizer, config.data)["fit"], config.fit.seq_len)
    windows = sequences[torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(0))[:4]]
    gated = bp.gate(model, config.gate)
    replay = removal.DensePrefix.logits_from
    seconds, found = {"replayed": [], "whole": []}, {}
    for _ in range(args.rounds):
        for variant in seconds:
            removal.DensePrefix.logits_from = replay if variant == "replayed" else whole_pass
            started = time.perf_counter()
            found[variant] = removal.critical_units(gated, windows, config.fit.critical_nll)
            seconds[variant].append(time.perf_counter() - started)
            print(variant, f"{seconds[variant][-1]:.1f} s", flush=True)
    removal.DensePrefix.logits_from = replay
    same = all(torch.equal(found["replayed"][k], found["whole"][k]) for k in found["whole"])
    median = {variant: statistics.median(values) for variant, values in seconds.items()}
    result = {"seconds": seconds, "median_seconds": median, "speed_up": median["whole"] / median["replayed"],
              "same_units": same, "units_found": {k: int(v.sum()) for k, v in found["replayed"].items()},
              "dtype": str(model.dtype).removeprefix("torch."), "threads": args.threads, "windows": list(windows.shape),
              "how": "one process, the two ways alternating; median over rounds", "machine": platform.platform(),
              "processor": platform.processor(), "torch": torch.__version__}
    print(f"whole {median['whole']:.1f} s, replayed {median['replayed']:.1f} s: {result['speed_up']:.2f}x; "
          f"same units: {same}")
    write_results(result, args.out)


if __name__ == "__main__":
    main()

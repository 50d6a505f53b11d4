"""Peak memory of extraction: streaming from the safetensors files vs loading the model.

Each path runs in a fresh Python process that first imports torch, transformers
and bayesprune (the fixed overhead, measured as the resident memory after the
imports), then extracts the same plan and reports its peak resident memory
(``ru_maxrss``). The streaming path reads only the kept slices of each tensor and
writes one tensor at a time; the in-memory path loads the whole model, cuts it and
saves it with ``save_pretrained``.

    .venv/bin/python bench/extract_memory.py --run runs/joint --targets 0.75 0.5
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_results

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import torch, transformers
import bayesprune as bp
from bayesprune.run.extract_job import run_extract

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

run, target, out, mode = sys.argv[1:5]
baseline = rss_mb()
started = time.time()
record = run_extract(run, bp.ExtractionConfig(target), out, streaming=(mode == "streaming"))
print(json.dumps({"mode": mode, "target": target, "baseline_rss_mb": baseline,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.time() - started, "file_bytes": record["file_bytes"],
                  "parameters": record["parameters"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/joint", help="a frozen-weight run directory")
    parser.add_argument("--targets", nargs="+", default=["0.75", "0.5"])
    parser.add_argument("--out", default="bench/results/extract_memory.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets:
            for mode in ("streaming", "in-memory"):
                out = Path(tmp) / f"{mode}-{target}"
                done = subprocess.run([sys.executable, "-c", CHILD, args.run, target, str(out), mode],
                                      capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                extracted_mb = row["file_bytes"] / 2**20
                row["extracted_mb"] = extracted_mb
                row["peak_over_baseline_mb"] = row["peak_rss_mb"] - row["baseline_rss_mb"]
                row["ratio_to_extracted"] = row["peak_over_baseline_mb"] / extracted_mb
                rows.append(row)
                print(f"{target:>5} {mode:<10} extracted {extracted_mb:7.1f} MiB  peak {row['peak_rss_mb']:7.1f} MiB "
                      f"(imports {row['baseline_rss_mb']:.0f})  peak-imports = {row['ratio_to_extracted']:.2f} × "
                      f"extracted  {row['seconds']:.1f} s", flush=True)
    result = {"run": args.run, "rows": rows, "machine": platform.platform(), "python": platform.python_version(),
              "how": "fresh process per row; baseline = VmRSS after imports; peak = ru_maxrss"}
    write_results(result, args.out)


if __name__ == "__main__":
    main()

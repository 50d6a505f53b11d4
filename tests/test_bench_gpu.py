"""The device benchmark's CPU check: the same script, the toy shape, one JSON summary under $OUT."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_the_gpu_benchmark_runs_on_cpu_and_writes_its_summary(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(root / "bench" / "gpu.sh"), "--device", "cpu", "--tiny", "--no-compile",
                           "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert json.loads(done.stdout) == result
    assert result["fit"][0]["tokens_per_s"] > 0
    rows = {r["model"]: r for r in result["inference"]}
    assert set(rows) == {"dense", "0.75", "0.5", "0.25"} and rows["dense"]["prefill_b1_speedup"] == 1.0
    assert rows["0.25"]["parameters"] < rows["0.75"]["parameters"] < rows["dense"]["parameters"]
    assert 1 < rows["0.75"]["ideal_prefill_speedup"] < rows["0.25"]["ideal_prefill_speedup"]

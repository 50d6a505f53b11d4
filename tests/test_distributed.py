"""A fit on two real processes (torchrun, gloo) gives the posterior of one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bayesprune.run.cli import main
from bayesprune.core.fit import CHECKPOINT_FORMAT
from bayesprune.core.io import load_tensors
from bayesprune.core.posterior import POSTERIOR_FORMAT
from bayesprune.run.rundir import RunDir

ARGS = ["--target", "none", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "256",
        "--eval-window", "64", "--dtype", "float32"]  # float32 sums: the processes agree to 1e-5


def torchrun(processes: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", "-m", "bayesprune.run.cli", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def locs(run):
    tensors, _ = load_tensors(run / RunDir.POSTERIOR, POSTERIOR_FORMAT)
    return {k: v for k, v in tensors.items() if k.startswith(("loc.", "scale."))}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
@pytest.mark.parametrize("costs", [1, 2])
def test_two_processes_fit_what_one_does(tiny_model_dir, corpus_dir, tmp_path, capsys, costs):
    fit = ["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--costs-per-step", str(costs)]
    alone = tmp_path / "alone"
    assert main([*fit, "--out", str(alone), *ARGS]) == 0
    together = tmp_path / "together"
    done = torchrun(2, *fit, "--out", str(together), *ARGS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("dense model:") == 1  # one process reports
    history = {run: load_tensors(run / RunDir.CHECKPOINT, CHECKPOINT_FORMAT)[1]["history"] for run in (alone, together)}
    assert [r["windows"] for r in history[alone]] == [4] * 4 and [r["windows"] for r in history[together]] == [2] * 4
    assert [r["loss"] for r in history[alone]] == pytest.approx([r["loss"] for r in history[together]], rel=1e-5)
    one, two = locs(alone), locs(together)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    assert not [p for p in together.iterdir() if ".partial-" in p.name]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed support")
def test_two_processes_fit_one_chain_each_what_one_process_fits_one_after_the_other(tiny_model_dir, corpus_dir,
                                                                                     tmp_path):
    from bayesprune.core.fit import chain_checkpoint

    fit = ["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--chains", "2", "--weights", "lora",
           "--seed", "1", *ARGS, "--target", "0.6"]  # each process scores its chain's cut at the target
    alone = tmp_path / "alone"
    assert main([*fit, "--out", str(alone)]) == 0
    together = tmp_path / "together"
    done = torchrun(2, *fit, "--out", str(together))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("2 chains, validation loss per token") == 1
    assert done.stdout.count("predicted perplexity of each chain's cut at 0.6") == 1
    scores = [[c["score"] for c in json.loads((run / "report.json").read_text())["chains"]] for run in (alone, together)]
    assert scores[0] == pytest.approx(scores[1], rel=1e-4)
    one, two = locs(alone), locs(together)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], rtol=1e-4, atol=1e-5), name
    assert load_tensors(alone / RunDir.POSTERIOR, POSTERIOR_FORMAT)[1]["chain"] == \
        load_tensors(together / RunDir.POSTERIOR, POSTERIOR_FORMAT)[1]["chain"]
    for chain in range(2):  # each process wrote its own chain's checkpoint, with its adapters
        a, _ = load_tensors(chain_checkpoint(alone / RunDir.CHECKPOINT, chain), CHECKPOINT_FORMAT)
        b, meta = load_tensors(chain_checkpoint(together / RunDir.CHECKPOINT, chain), CHECKPOINT_FORMAT)
        assert [r["windows"] for r in meta["history"]] == [4] * 4  # a whole chain's mini-batches, not a share
        lora = [k for k in a if ".lora_" in k]
        assert lora and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in lora)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tiny_model_dir, corpus_dir, tmp_path):
    args = [*ARGS]
    args[args.index("--batch-size") + 1] = "3"
    done = torchrun(2, "fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir),
                    "--out", str(tmp_path / "r"), *args)
    assert done.returncode != 0 and "does not split evenly over 2 processes" in done.stderr
    assert "Loading weights" not in done.stderr  # refused before the model is loaded


SCRIPT = """
import sys, torch
from bayesprune import FitConfig, GateConfig, fit, gate
from bayesprune.core.distributed import finish, initialise
from tests.conftest import tiny_model
initialise(None)
sequences = torch.load(sys.argv[1])
fit(gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron"))), sequences,
    FitConfig(steps=int(sys.argv[3]), batch_size=4, seq_len=12, checkpoint_every=1, schedule="constant"), checkpoint=sys.argv[2] + "/checkpoint.safetensors",
    progress=False)
finish()
"""


def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path):
    from bayesprune import FitConfig, GateConfig, fit, gate
    from tests.conftest import VOCAB, tiny_model

    sequences = torch.randint(0, VOCAB, (24, 12), generator=torch.Generator().manual_seed(0))
    torch.save(sequences, tmp_path / "sequences.pt")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "script.py"), str(tmp_path / "sequences.pt"), str(tmp_path / "run"), "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    config = FitConfig(steps=4, batch_size=4, seq_len=12, schedule="constant")  # extended from 2 steps: constant rate
    resumed = fit(gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron"))), sequences, config,
                  checkpoint=tmp_path / "run" / RunDir.CHECKPOINT, progress=False)
    alone = fit(gate(tiny_model("llama"), GateConfig(units=("block", "head", "neuron"))), sequences, config,
                progress=False)
    assert [r["windows"] for r in resumed.history] == [2, 2, 4, 4]
    # Adapters are trained too (the default): averaging their gradients over processes sums in another order.
    for (name, a), b in zip(resumed.guide.state_dict().items(), alone.guide.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-4, atol=5e-5), name


def test_fewer_chains_than_processes_are_refused_unless_one():
    from bayesprune.core.distributed import check_chains

    for chains, processes in ((1, 4), (4, 4), (5, 4), (3, 1)):
        check_chains(chains, processes)
    with pytest.raises(ValueError, match="2 chains on 4 processes"):
        check_chains(2, 4)

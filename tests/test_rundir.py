"""Bad input and hostile use of the command line: a clear error, nothing lost, nothing silently wrong."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bayesprune.run.cli import main
from bayesprune.core.fit import CHECKPOINT_FORMAT
from bayesprune.core.io import FileFormat, atomic_path, load_tensors, read_json, save_tensors, write_json
from bayesprune.core.posterior import POSTERIOR_FORMAT
from bayesprune.run.rundir import RunDir
from tests.test_cli import FIT_ARGS


def fit_args(model, corpus, out, *extra):
    return ["fit", "--model", str(model), "--data", str(corpus), "--out", str(out), "--target", "none",
            *FIT_ARGS, *extra]


@pytest.fixture
def fitted(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(tiny_model_dir, corpus_dir, run)) == 0
    capsys.readouterr()
    return run


def error_of(capsys) -> str:
    return capsys.readouterr().err


def test_a_model_folder_is_not_taken_for_a_run(tiny_model_dir, corpus_dir, capsys):
    before = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()}
    assert main(fit_args(tiny_model_dir, corpus_dir, tiny_model_dir)) == 2
    assert "is not a bayesprune run directory" in error_of(capsys)
    assert {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()} == before


@pytest.mark.parametrize("content", ["[1, 2]", "garbage{", '{"fit": {"steps": "many"}}', '{"model": 3}'])
def test_a_broken_run_config_is_reported(fitted, tmp_path, capsys, content):
    (fitted / "config.json").write_text(content)
    assert main(["extract", str(fitted), "--target", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert "is not a bayesprune run config" in error_of(capsys) and not (tmp_path / "s").exists()


def test_an_output_that_is_a_file_is_refused(tiny_model_dir, corpus_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(fit_args(tiny_model_dir, corpus_dir, tmp_path / "file")) == 2
    assert "is a file" in error_of(capsys) and (tmp_path / "file").read_text() == "mine"


def test_paths_are_stored_absolute_and_the_model_is_checked(tiny_model_dir, corpus_dir, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    run = tmp_path / "run"
    assert main(fit_args(tiny_model_dir.name, corpus_dir, run)) == 0
    assert json.loads((run / "config.json").read_text())["model"] == str(tiny_model_dir)
    # ./m and m are the same model: the run resumes instead of refusing.
    assert main(fit_args(f"./{tiny_model_dir.name}", corpus_dir, run)) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"  # where a folder of the same relative name holds another model
    (elsewhere / tiny_model_dir.name).mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert main(["extract", str(run), "--target", "0.5", "--out", "small"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == "small"
    weights = tiny_model_dir / "model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    assert main(["extract", str(run), "--target", "0.5", "--out", "small-2"]) == 2
    assert "has changed since" in error_of(capsys) and not (elsewhere / "small-2").exists()


def test_resume_refuses_changed_data_and_names_the_setting(tiny_model_dir, corpus_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    run = tmp_path / "run"
    assert main(fit_args(tiny_model_dir, corpus, run)) == 0
    assert main(fit_args(tiny_model_dir, corpus, run, "--seed", "3")) == 2
    assert "other settings (fit.seed: 0 → 3)" in error_of(capsys)
    for path in corpus.iterdir():  # the same settings, other text at the same path
        path.write_text(path.read_text()[::-1])
    assert main(fit_args(tiny_model_dir, corpus, run)) == 2
    assert "was fitted on another data" in error_of(capsys)


def test_a_failed_fit_does_not_block_its_output(tiny_model_dir, tmp_path, capsys, corpus_dir):
    short = tmp_path / "short"
    short.mkdir()
    for path in sorted(corpus_dir.iterdir()):
        (short / path.name).write_text(path.read_text()[:40])
    run = tmp_path / "run"
    # The test split is shorter than one window of 64 tokens: the run fails before fitting anything…
    assert main(fit_args(tiny_model_dir, short, run)) == 2
    assert "evaluation tokens" in error_of(capsys) and not (run / RunDir.CHECKPOINT).exists()
    # … and the same folder takes other settings.
    assert main(fit_args(tiny_model_dir, short, run, "--seq-len", "8", "--eval-window", "8")) == 0


@pytest.mark.parametrize("option", ["--cost", "--cost-rate", "--offset-scale", "--zero-cost"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_settings_are_refused(tmp_path, capsys, option, value):
    assert main(["fit", option, value, "--out", str(tmp_path / "r")]) == 2
    assert "finite" in error_of(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["random bytes", "utf-16", "binary jsonl"])
def test_non_text_data_is_refused_naming_the_file(tiny_model_dir, tmp_path, capsys, kind):
    data = tmp_path / ("data.jsonl" if "jsonl" in kind else "data.txt")
    if kind == "utf-16":
        data.write_text("To be, or not to be, that is the question.\n" * 50, encoding="utf-16")
    else:
        data.write_bytes(os.urandom(4096))
    assert main(fit_args(tiny_model_dir, data, tmp_path / "r")) == 2
    err = error_of(capsys)
    assert str(data) in err and "text" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("target, message", [("1.5", "fraction above 1"), ("1B", "more than the whole model"),
                                             ("1GB", "more than the whole model"),
                                             ("150%", "more than the whole model"),
                                             ("9layers", "more than the model's 4 blocks")])
def test_targets_the_model_cannot_meet_are_refused_before_loading(tiny_model_dir, corpus_dir, tmp_path, capsys,
                                                                  monkeypatch, target, message):
    import bayesprune.run.fit_job as fit_job

    monkeypatch.setattr(fit_job, "load_model", lambda *a: pytest.fail("weights were loaded"))
    args = fit_args(tiny_model_dir, corpus_dir, tmp_path / "r", "--units", "block")
    args[args.index("--target") + 1] = target
    assert main(args) == 2
    assert message in error_of(capsys) and not (tmp_path / "r").exists()


@pytest.mark.parametrize("option", ["--seq-len", "--eval-window"])
def test_lengths_beyond_the_models_positions_are_refused(tiny_model_dir, corpus_dir, tmp_path, capsys, option):
    args = fit_args(tiny_model_dir, corpus_dir, tmp_path / "r", option, "300", "--eval-tokens", "600")
    assert main(args) == 2
    assert f"{option} 300 is longer than the model's 256 positions" in error_of(capsys)


def test_a_block_run_says_when_whole_blocks_cannot_meet_a_size(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(fit_args(tiny_model_dir, corpus_dir, run, "--units", "block")) == 0
    capsys.readouterr()
    assert main(["extract", str(run), "--target", "0.1", "--out", str(tmp_path / "s")]) == 2
    assert "one whole block needs" in error_of(capsys)


def test_a_posterior_holding_nan_writes_no_model(fitted, tmp_path, capsys):
    tensors, meta = load_tensors(fitted / RunDir.POSTERIOR, POSTERIOR_FORMAT)
    name = next(k for k in tensors if k.startswith("importance."))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_tensors(fitted / RunDir.POSTERIOR, tensors, POSTERIOR_FORMAT, meta)
    assert main(["extract", str(fitted), "--target", "0.5", "--out", str(tmp_path / "s")]) == 2
    assert "non-finite" in error_of(capsys) and not (tmp_path / "s").exists()


def test_what_a_killed_write_left_is_removed_by_the_next(fitted, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    leftovers = [tmp_path / f".small.partial-{pid}-abcd", fitted / f".posterior.nc.partial-{pid}-x.nc"]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half")
    leftovers[1].write_bytes(b"half")
    alive = tmp_path / f".small.partial-{os.getpid()}-live"  # a write still in progress is left alone
    alive.mkdir()
    assert main(["extract", str(fitted), "--target", "0.5", "--out", str(tmp_path / "small")]) == 0
    with atomic_path(fitted / "posterior.nc") as tmp:
        tmp.write_bytes(b"new")
    assert not any(p.exists() for p in leftovers) and alive.exists()
    assert not [p for p in fitted.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
                         ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_during_fit_keeps_a_resumable_checkpoint(tiny_model_dir, corpus_dir, tmp_path, signum, code,
                                                                   said):
    run = tmp_path / "run"
    args = fit_args(tiny_model_dir, corpus_dir, run)
    args[args.index("--steps") + 1] = "100000"
    child = subprocess.Popen([sys.executable, "-m", "bayesprune.run.cli", *args], stderr=subprocess.PIPE, text=True)
    seen = ""
    while "SVI" not in seen or "nll=" not in seen:  # a step has been taken
        seen += child.stderr.read(1) or pytest.fail(f"the fit ended early: {seen}")
    child.send_signal(signum)
    err = child.stderr.read()
    assert child.wait() == code
    assert f"{said}; the fit's checkpoint is in" in err and "Traceback" not in err
    step = load_tensors(run / RunDir.CHECKPOINT, CHECKPOINT_FORMAT)[1]["step"]
    assert step >= 0 and not (run / RunDir.POSTERIOR).exists()


def test_every_file_carries_one_marker_and_foreign_or_newer_ones_are_refused(tmp_path):
    form = FileFormat("bayesprune-thing", "a bayesprune thing", legacy=("old thing",))
    write_json(tmp_path / "a.json", form, {"x": 1})
    assert read_json(tmp_path / "a.json", form) == {"format": "bayesprune-thing", "version": 1, "x": 1}
    (tmp_path / "old.json").write_text(json.dumps({"format": "old thing", "x": 0}))
    assert read_json(tmp_path / "old.json", form)["x"] == 0
    for name, content, message in (
            ("newer.json", json.dumps({"format": "bayesprune-thing", "version": 2}), "is a bayesprune thing of format version 2"),
            ("foreign.json", json.dumps({"format": "other"}), r"is not a bayesprune thing \(format marker 'other'"),
            ("list.json", "[1, 2]", r"is not a bayesprune thing \(it holds a list"),
            ("gguf.json", "GGUF\x03garbage", "is not a bayesprune thing \\(not a JSON file")):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"{name} {message}"):
            read_json(tmp_path / name, form)
    save_tensors(tmp_path / "t.safetensors", {"a": torch.ones(2)}, form, {"y": 2})
    assert load_tensors(tmp_path / "t.safetensors", form)[1]["y"] == 2
    with pytest.raises(ValueError, match="t.safetensors is not a bayesprune posterior"):
        load_tensors(tmp_path / "t.safetensors", POSTERIOR_FORMAT)


def _holder(run, job: str, exclusive: bool = True):
    """A real process that holds ``run`` for ``job`` until it is killed; returns it once it holds it."""
    code = ("import sys, time\nfrom bayesprune.run.rundir import holding\n"
            f"with holding({str(run)!r}, {job!r}, exclusive={exclusive}):\n    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_run_has_one_writer_and_a_dead_writers_lock_is_taken(fitted, tiny_model_dir, corpus_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in fitted.iterdir() if p.is_file()}
    holder = _holder(fitted, "fit")
    try:
        for args in (fit_args(tiny_model_dir, corpus_dir, fitted), ["depth", str(fitted)]):
            done = subprocess.run([sys.executable, "-m", "bayesprune", *args], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 2 and f"process {holder.pid} is running bayesprune fit" in done.stderr
        # readers are refused while a writer holds the run, and nothing was written
        done = subprocess.run([sys.executable, "-m", "bayesprune", "extract", str(fitted), "--target", "0.5",
                               "--out", str(tmp_path / "small")], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "is in use" in done.stderr and not (tmp_path / "small").exists()
    finally:
        holder.kill()
        holder.wait()
    assert {p.name: p.read_bytes() for p in fitted.iterdir() if p.is_file() and p.name != "run.lock"} == \
        {k: v for k, v in before.items() if k != "run.lock"}
    assert main(["depth", str(fitted), "--removals", "1", "--windows", "2", "--chunk", "2"]) == 0  # taken over


def test_readers_share_a_run_and_keep_writers_out(fitted, tiny_model_dir, corpus_dir, tmp_path, capsys):
    reader = _holder(fitted, "extract", exclusive=False)
    try:
        assert main(["extract", str(fitted), "--target", "0.5", "--out", str(tmp_path / "small")]) == 0
        assert main(["depth", str(fitted), "--removals", "1", "--windows", "2", "--chunk", "2"]) == 2
        assert "a bayesprune extract or draft is reading it" in error_of(capsys)
    finally:
        reader.kill()
        reader.wait()


def test_two_extractions_into_one_folder_leave_one_model(fitted, tmp_path):
    out = tmp_path / "small"
    command = [sys.executable, "-m", "bayesprune", "extract", str(fitted), "--target", "0.5", "--out", str(out)]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [(child.wait(timeout=300), child.stderr.read()) for child in children]
    assert sorted(code for code, _ in results) == [0, 2]
    assert "already exists" in next(err for code, err in results if code == 2)
    assert (out / "model.safetensors").is_file() and json.loads((out / "bayesprune_extraction.json").read_text())
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_a_fit_refused_before_it_wrote_leaves_no_folder(tiny_model_dir, corpus_dir, tmp_path):
    holder = _holder(tmp_path / "new", "fit")
    try:
        assert main(fit_args(tiny_model_dir, corpus_dir, tmp_path / "new")) == 2
    finally:
        holder.kill()
        holder.wait()
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["run.lock"]  # the holder's, left by a killed process
    assert main(fit_args(tiny_model_dir, corpus_dir, tmp_path / "new")) == 0


def _rewrite_metadata(path, drop=(), **changes):
    """Rewrite a bayesprune safetensors file with some fields of its metadata changed and those in ``drop`` gone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = json.loads(handle.metadata()["bayesprune"])
    meta = {k: v for k, v in (meta | changes).items() if k not in drop}
    save_file(load_file(str(path)), str(path), metadata={"bayesprune": json.dumps(meta)})


def _rewrite_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("file, damage, message", [
    (RunDir.RUN, lambda p: _rewrite_json(p, model={"path": 3}), "run.json is a damaged bayesprune run marker: "
                                                                "model.path must be a string, got 3"),
    (RunDir.RUN, lambda p: _rewrite_json(p, data=None), "data must be an object, got None"),
    (RunDir.CONFIG, lambda p: _rewrite_json(p, fit={"likelihood": "joy"}),
     "FitConfig.likelihood must be one of 'nll', 'distillation', got 'joy'"),
    (RunDir.POSTERIOR, lambda p: _rewrite_metadata(p, num_draws=0),
     "posterior.safetensors is a damaged bayesprune posterior: num_draws must be an integer ≥ 1, got 0"),
    (RunDir.POSTERIOR, lambda p: _rewrite_metadata(p, units={"head": "4"}), "units['head'] must be an integer ≥ 1"),
    (RunDir.POSTERIOR, lambda p: _rewrite_metadata(p, kinds=["wings"]), "gates unit kinds ['wings']"),
    (RunDir.POSTERIOR, lambda p: _rewrite_metadata(p, drop=("layer_names",)), "it lacks 'layer_names'"),
    (RunDir.DEPTH, lambda p: _rewrite_json(p, steps=[{"removed": 1, "scores": {"1": "low"}, "choice_probability": 2}]),
     "depth.json is a damaged bayesprune depth ranking: steps[0].scores['1'] must be a finite number, got 'low'"),
    (RunDir.DEPTH, lambda p: _rewrite_json(p, order=["first"]), "order[0] must be an integer ≥ 0, got 'first'"),
])
def test_a_damaged_run_file_is_named_with_what_is_wrong_before_anything_is_written(fitted, tmp_path, capsys, file,
                                                                                   damage, message):
    if file == RunDir.DEPTH:
        assert main(["depth", str(fitted), "--removals", "2", "--windows", "2", "--chunk", "2"]) == 0
    damage(fitted / file)
    out = tmp_path / "small"
    target = "2layers" if file == RunDir.DEPTH else "0.5"
    assert main(["extract", str(fitted), "--target", target, "--out", str(out)]) == 2
    assert message in error_of(capsys) and not out.exists()


@pytest.mark.parametrize("changes, message", [({"step": -1}, "step must be an integer ≥ 0, got -1"),
                                              ({"history": "long"}, "history must be a list"),
                                              ({"drop": ("fit",)}, "it lacks 'fit'")])
def test_a_damaged_checkpoint_is_named_and_kept(tiny_model_dir, corpus_dir, tmp_path, capsys, changes, message):
    run = tmp_path / "run"
    assert main(fit_args(tiny_model_dir, corpus_dir, run, "--steps", "2")) == 0
    checkpoint = RunDir(run).checkpoint
    _rewrite_metadata(checkpoint, **changes)
    held = checkpoint.read_bytes()
    capsys.readouterr()
    assert main(fit_args(tiny_model_dir, corpus_dir, run, "--steps", "2", "--force")) == 2
    said = error_of(capsys)
    assert f"{checkpoint} is a damaged bayesprune fit checkpoint: {message}" in said, said
    assert checkpoint.read_bytes() == held


def test_damaged_weights_and_a_full_disk_give_one_line_and_no_traceback(fitted, tiny_model_dir, tmp_path):
    import shutil

    truncated, pickled = tmp_path / "truncated", tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    code = "import torch, sys\nclass Payload:\n    def __reduce__(self): return (print, ('ran',))\n" \
           "torch.save({'w': Payload()}, sys.argv[1])\n"
    subprocess.run([sys.executable, "-c", code, str(pickled / "pytorch_model.bin")], check=True)
    for model, message in ((truncated, "not a readable safetensors file"), (pickled, "does not unpickle code")):
        done = subprocess.run([sys.executable, "-m", "bayesprune", "evaluate", str(model), "--eval-tokens", "64",
                               "--eval-window", "32"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "ran" not in done.stdout
    # A disk that fills while the model is written: the write fails, nothing half-written is left.
    limit = "import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n" \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n" \
            "from bayesprune.run.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    out = tmp_path / "small"
    done = subprocess.run([sys.executable, "-c", limit, "extract", str(fitted), "--target", "0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "nothing was half-written" in done.stderr and "Traceback" not in done.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    debug = subprocess.run([sys.executable, "-m", "bayesprune", "evaluate", str(truncated), "--debug"],
                           capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_folder_that_may_not_be_written_gives_one_line_and_loses_nothing(fitted, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem or user cannot make a folder immutable (chattr +i)")
    try:
        done = subprocess.run([sys.executable, "-m", "bayesprune", "extract", str(fitted), "--target", "0.5",
                               "--out", str(locked / "small")], capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"not allowed to write or read {locked / 'small'} (Operation not permitted)" in done.stderr
    assert list(locked.iterdir()) == []


def test_rerunning_a_finished_fit_rewrites_nothing_unless_asked(tiny_model_dir, corpus_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["fit", "--model", str(tiny_model_dir), "--data", str(corpus_dir), "--out", str(run), "--target", "0.5",
            *FIT_ARGS]
    assert main(args) == 0
    (run / "extracted" / "notes.txt").write_text("mine")
    def written():  # what the run holds, but the lock its jobs take
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != RunDir.LOCK}

    before = written()
    capsys.readouterr()
    assert main(args) == 0
    assert "already holds this fit and its extraction" in capsys.readouterr().out
    assert written() == before
    other_target = [*args[:args.index("0.5")], "0.6", *args[args.index("0.5") + 1:]]
    assert main(other_target) == 2  # a new target would replace the folder holding the user's file
    assert "holds files the fit did not write (notes.txt)" in capsys.readouterr().err
    assert (run / "extracted" / "notes.txt").read_text() == "mine"
    assert main([*args, "--force"]) == 0
    assert not (run / "extracted" / "notes.txt").exists()  # asked for
    assert main(other_target) == 0  # a new target extracts again
    assert json.loads((run / "report.json").read_text())["extraction"]["target"] == "0.6"


def test_a_depth_ranking_is_replaced_only_when_asked(fitted, capsys):
    depth = ["depth", str(fitted), "--windows", "2", "--chunk", "2"]
    assert main([*depth, "--removals", "2"]) == 0
    held = (fitted / RunDir.DEPTH).read_bytes()
    assert main([*depth, "--removals", "1"]) == 2
    assert "already ranks 2 removals" in error_of(capsys) and (fitted / RunDir.DEPTH).read_bytes() == held
    assert main([*depth, "--removals", "1", "--force"]) == 0
    assert len(json.loads((fitted / RunDir.DEPTH).read_text())["order"]) == 1


def test_options_that_would_do_nothing_or_overflow_and_damaged_rankings_are_refused(fitted, tiny_model_dir, corpus_dir,
                                                                                    tmp_path, capsys):
    new = tmp_path / "new"
    for extra, message in ((["--seed", str(2 ** 64)], "seed must be an integer in [0, 2**63)"),
                           (["--units", "head,neuron", "--two-point-blocks", "2"], "--two-point-blocks 2 acts on block"),
                           (["--units", "head,neuron", "--block-importance", "removal"], "acts on block gates"),
                           (["--units", "neuron", "--multiple", "64"], "--multiple 64 is more than the 48 neurons")):
        assert main(fit_args(tiny_model_dir, corpus_dir, new, *extra)) == 2
        assert message in error_of(capsys) and not new.exists()
    assert main(["evaluate", str(fitted)]) == 2 and "is a bayesprune run directory, not a model" in error_of(capsys)
    assert main(["depth", str(fitted), "--removals", "2", "--windows", "2", "--chunk", "2"]) == 0
    record = json.loads((fitted / RunDir.DEPTH).read_text())
    for order in ([1, 1], [0, 7]):
        (fitted / RunDir.DEPTH).write_text(json.dumps({**record, "order": order}))
        assert main(["extract", str(fitted), "--target", "2layers", "--out", str(tmp_path / "s")]) == 2
        assert "must name distinct blocks of 0..3" in error_of(capsys) and not (tmp_path / "s").exists()


@pytest.mark.parametrize("command", ["fit", "extract", "depth", "draft", "router", "route", "evaluate"])
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a device this machine lacks")
def test_a_device_that_is_not_here_is_refused_before_any_file_is_read(tmp_path, capsys, command):
    missing = str(tmp_path / "missing")
    args = {"fit": ["--out", missing], "extract": [missing, "--target", "0.5", "--out", missing], "depth": [missing],
            "draft": [missing, "--out", missing], "router": ["--domains", "a,b", "--out", missing],
            "route": [missing, "--prompt", "x"], "evaluate": [missing]}[command]
    for device, message in (("cuda", "torch sees no CUDA device here"), ("tpu9", "unknown device 'tpu9'")):
        assert main([command, *args, "--device", device]) == 2
        assert message in error_of(capsys) and not os.path.exists(missing)


def test_a_model_without_a_tokenizer_or_a_damaged_gguf_is_refused_by_name(tiny_model_dir, corpus_dir, tmp_path,
                                                                         capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    assert main(fit_args(bare, corpus_dir, tmp_path / "run")) == 2
    assert f"{bare} has no tokenizer" in error_of(capsys) and not (tmp_path / "run").exists()
    damaged = tmp_path / "model.gguf"
    damaged.write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 3)
    assert main(["evaluate", str(damaged)]) == 2
    assert f"{damaged} is not a readable GGUF file" in error_of(capsys)

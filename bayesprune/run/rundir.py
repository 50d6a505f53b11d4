"""The run directory: what makes a folder a bayesprune run, and the checks that keep it one run.

:class:`RunDir` names every file a run holds. ``run.json`` is its marker (the format, the
absolute path and a fingerprint of the model, a fingerprint of the data), beside
``config.json`` (every setting). bayesprune writes only into a folder that is missing, empty or one of its
own runs; a run that has fitted anything resumes only with the same settings, model
and data, and extraction refuses a model that no longer matches its fingerprint.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

import torch

from ..core.adapters import merge_checkpoint_adapters
from ..core.config import DEPTH_SCORES, RunConfig
from ..core.fit import CHECKPOINT_FORMAT, chain_checkpoint, load_network
from ..core.io import FileFormat, load_tensors, read_json, read_metadata, write_json
from ..core.posterior import POSTERIOR_FORMAT, GatePosterior
from ..core.schema import Integer, Number, OneOf
from ..inputs.pretrained import load_model

RUN_FORMAT = FileFormat("bayesprune-run", "a bayesprune run marker",
                        schema={"model": {"path": str, "files": {str: str}}, "data": dict})
DEPTH_FORMAT = FileFormat("bayesprune-depth", "a bayesprune depth ranking",
                          legacy=("bayesprune conditional depth search",),
                          schema={"order": [Integer(0)], "score": OneOf(DEPTH_SCORES), "tokens": Integer(0),
                                  "evaluations": Integer(0), "seconds": Number(0),
                                  "steps": [{"removed": Integer(0), "scores": {str: float},
                                             "choice_probability": Number(0, 1)}]})


class _File:
    """A file of a run directory by name: on a :class:`RunDir` its path, on the class its name."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, run, owner) -> Path | str:
        return self.name if run is None else run.path / self.name


class RunDir:
    """A run directory and every file bayesprune keeps in it (``RunDir(path).posterior`` is a path,
    ``RunDir.POSTERIOR`` the name)."""

    RUN = "run.json"                          # the marker: model and data fingerprints (RUN_FORMAT)
    CONFIG = "config.json"                    # every setting (RunConfig)
    CHECKPOINT = "checkpoint.safetensors"     # resumable fit state (core.fit.CHECKPOINT_FORMAT)
    POSTERIOR = "posterior.safetensors"       # the fitted posterior (core.posterior.POSTERIOR_FORMAT)
    INFERENCE_DATA = "posterior.nc"           # ArviZ InferenceData over a cost grid
    SUMMARY = "summary.csv"                   # az.summary of the per-layer variables
    REPORT = "report.json"                    # what the fit job measured and wrote
    DEPTH = "depth.json"                      # the conditional depth ranking (DEPTH_FORMAT)
    LOCK = "run.lock"                         # held by the job using the run (see holding)
    EXTRACTED = "extracted"                   # the model the fit job extracted
    PLOTS = {"inclusion_plot": "inclusion.png", "threshold_plot": "thresholds.png",
             "size_curve_plot": "size_curve.png", "forest_plot": "forest.png", "width_plot": "width.png"}
    run, config, checkpoint, posterior = _File(RUN), _File(CONFIG), _File(CHECKPOINT), _File(POSTERIOR)
    report, depth, lock, extracted = _File(REPORT), _File(DEPTH), _File(LOCK), _File(EXTRACTED)

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)


class RunBusyError(OSError):
    """Another process is using the run directory."""


@contextlib.contextmanager
def holding(run_dir: str | Path, job: str, exclusive: bool = True):
    """Hold the run directory for ``job``: one writer (``fit``, ``depth``) or any number of readers
    (``extract``, ``draft``) at a time, refused at once otherwise, naming the writer's process.

    An advisory ``flock`` on ``run.lock``: the kernel drops it when its process ends, however it ends,
    so the lock of a process that died is simply taken. A folder made here and left with nothing but
    the lock (a job refused or failed before writing) is removed again.
    """
    run = RunDir(run_dir)
    if not exclusive and not run.path.is_dir():
        yield run  # nothing to read: the job itself says so
        return
    created = not run.path.exists()
    run.path.mkdir(parents=True, exist_ok=True)
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            raise RunBusyError(f"{run} is in use: {holder or 'a bayesprune extract or draft is reading it'}; "
                               f"wait for it to finish, or choose another folder") from None
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} is running bayesprune {job}".encode(), 0)
        try:
            yield run
        finally:
            if exclusive:
                os.ftruncate(fd, 0)
            if created and {p.name for p in run.path.iterdir()} <= {RunDir.LOCK}:
                run.lock.unlink()
                run.path.rmdir()
    finally:
        os.close(fd)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sample(path: Path, chunk: int = 1 << 20) -> str:
    """Size and a hash of the first and last MiB of a weight file: cheap at any size, and headers differ."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(chunk)
        handle.seek(max(0, size - chunk))
        return f"{size}:{_sha256(head + handle.read(chunk))}"


def model_fingerprint(path: str | Path) -> dict:
    """A model's identity without reading all its weights: config, weight index and a sample of each weight file."""
    path = Path(path).resolve()
    if path.is_file():
        return {"path": str(path), "files": {path.name: _sample(path)}}
    files = {f.name: _sample(f) for f in sorted(path.iterdir()) if f.suffix in _WEIGHT_SUFFIXES}
    described = {f.name: _sha256(f.read_bytes()) for f in sorted(path.glob("*.json"))
                 if f.name == "config.json" or f.name.endswith(".index.json")}
    return {"path": str(path), "files": files, "sha256": described}


def data_fingerprint(splits: dict[str, torch.Tensor]) -> dict:
    """The token streams a run fits and scores: their lengths and a hash of their ids."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        digest.update(splits[name].to(torch.int64).numpy().tobytes())
    return {"tokens": {name: int(t.numel()) for name, t in sorted(splits.items())}, "sha256": digest.hexdigest()}


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old: dict, new: dict) -> list[str]:
    """``"name: old → new"`` for every setting that differs."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} → {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read_identity(run_dir: str | Path) -> dict:
    """``run.json`` of a run directory; anything else is refused as not a bayesprune run."""
    run = RunDir(run_dir)
    if not run.run.is_file():
        raise FileNotFoundError(f"{run} is not a bayesprune run directory (no {RunDir.RUN})")
    return read_json(run.run, RUN_FORMAT)


def read_config(run_dir: str | Path) -> RunConfig:
    """The settings a run was made with."""
    path = RunDir(run_dir).config
    read_identity(run_dir)
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir} is a bayesprune run without its {RunDir.CONFIG}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise ValueError(f"{path} is not a bayesprune run config ({err})") from err


def has_fitted(run_dir: str | Path) -> bool:
    """Whether the run has fitted anything (a checkpoint or a posterior) that other settings would contradict."""
    run = RunDir(run_dir)
    return run.checkpoint.exists() or run.posterior.exists()


def check_output(run_dir: str | Path, config: RunConfig) -> None:
    """Before anything is loaded: refuse a file, a folder bayesprune did not make, or a fitted run with other settings."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run directory; choose another --out")
    if not run_dir.exists() or not [p for p in run_dir.iterdir() if p.name != RunDir.LOCK and ".partial-" not in p.name]:
        return  # empty, or only what a starting job of bayesprune's holds
    try:
        read_identity(run_dir)
    except FileNotFoundError:
        raise FileExistsError(f"{run_dir} exists and is not a bayesprune run directory (no {RunDir.RUN}); "
                              f"nothing was written; choose another --out") from None
    if has_fitted(run_dir):
        changed = differences(read_config(run_dir).to_dict(), config.to_dict())
        if changed:
            raise FileExistsError(f"{run_dir} holds a run fitted with other settings ({'; '.join(changed)}); "
                                  f"the same settings resume it, or choose another --out")
        run = RunDir(run_dir)
        for path, form in ((run.checkpoint, CHECKPOINT_FORMAT), (run.posterior, POSTERIOR_FORMAT)):
            if path.exists():
                read_metadata(path, form)


def claim(run_dir: str | Path, config: RunConfig, model: dict, data: dict, write: bool = True) -> None:
    """Mark ``run_dir`` as this run (after :func:`check_output`); a run that has fitted must match model and data.

    ``write=False`` checks only (the other processes of a data-parallel fit)."""
    run_dir = Path(run_dir)
    check_output(run_dir, config)
    if has_fitted(run_dir):
        identity = read_identity(run_dir)
        for key, new in (("model", model), ("data", data)):
            changed = differences(identity.get(key, {}), new)
            if changed:
                raise FileExistsError(f"{run_dir} was fitted on another {key} ({'; '.join(changed)}); "
                                      f"choose another --out")
    if not write:
        return
    write_json(RunDir(run_dir).run, RUN_FORMAT, {"model": model, "data": data})
    config.save(RunDir(run_dir).config)


def fitted_model_path(run_dir: str | Path) -> Path:
    """The model a run was fitted on, checked against its fingerprint."""
    recorded = read_identity(run_dir)["model"]
    path = Path(recorded["path"])
    if not path.exists():
        raise FileNotFoundError(f"the model {run_dir} was fitted on is gone from {path}")
    changed = differences(recorded, model_fingerprint(path))
    if changed:
        raise ValueError(f"the model at {path} has changed since {run_dir} was fitted ({'; '.join(changed)})")
    return path


def load_fitted(run_dir: str | Path) -> GatePosterior:
    """The posterior a run fitted."""
    run = RunDir(run_dir)
    read_config(run_dir)
    if not run.posterior.is_file():
        raise FileNotFoundError(f"{run} has no {RunDir.POSTERIOR}: its fit has not finished "
                                f"(rerun 'bayesprune fit' with the same settings to resume it)")
    return GatePosterior.load(run.posterior)


def network_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint holding the network of the chain the run's posterior selected (the first, with one)."""
    run = RunDir(run_dir)
    return chain_checkpoint(run.checkpoint, read_metadata(run.posterior, POSTERIOR_FORMAT).get("chain", 0))


def load_dense_model(run_dir: str | Path, device: str | None = None):
    """The network a run started from, as its source holds it, in ``device``'s native compute dtype: what a
    distillation recovery fine-tunes the cut towards."""
    return load_model(str(fitted_model_path(run_dir)), device, "auto")[0]


def load_fitted_model(run_dir: str | Path, device: str | None = None, dtype: str | None = None,
                      adapter_share: float = 1.0):
    """The run's network (with jointly trained weights or adapters, of the selected chain) and tokenizer; an adapter
    fit's weight change merged at ``adapter_share`` of its fitted size."""
    config = read_config(run_dir)
    model, tokenizer = load_model(str(fitted_model_path(run_dir)), device, dtype)
    if config.fit.weights == "joint":
        tensors, _ = load_tensors(network_checkpoint(run_dir), CHECKPOINT_FORMAT)
        with torch.no_grad():
            load_network(model, tensors)
    elif config.fit.weights == "lora":
        tensors, _ = load_tensors(network_checkpoint(run_dir), CHECKPOINT_FORMAT)
        merge_checkpoint_adapters(model, tensors, config.fit.lora_scale * adapter_share)
    return model, tokenizer


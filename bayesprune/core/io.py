"""Atomic file writes and safe tensor files: nothing is half-written, nothing is unpickled.

Every file bayesprune writes carries one kind of marker (:class:`FileFormat`):
``{"format": "bayesprune-…", "version": n}`` in its JSON, or in the JSON metadata of a
safetensors file; readers check it before they use anything else.

Every temporary name is ``.NAME.partial-PID-XXXX`` beside its target: a write
killed outright (``kill -9``) leaves one behind, and the next write of the same
name removes those whose process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .schema import SchemaError, validate

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def _partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str | Path) -> list[Path]:
    """Remove what interrupted writes of ``path`` left beside it (their process is gone); returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = _partial_prefix(path)
    for leftover in path.parent.iterdir():
        if not leftover.name.startswith(prefix):
            continue
        pid = leftover.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover) if leftover.is_dir() and not leftover.is_symlink() else leftover.unlink()
            removed.append(leftover)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary file name beside ``path``; it replaces ``path`` only if the block succeeds.

    For writers that want a file name (``savefig``, ``to_netcdf``, ``save_file``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    suffix = "".join(path.suffixes[-1:])  # writers that pick a format by extension still see it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_partial_prefix(path)}{os.getpid()}-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, value) -> None:
    atomic_write_text(path, json.dumps(value, indent=2))


@dataclass(frozen=True)
class FileFormat:
    """The marker of one kind of file: ``name`` and ``version``, what the file is (for messages), the
    ``legacy`` markers of files written before this convention (``None``: no marker), read as version 1,
    and the ``schema`` (:mod:`bayesprune.core.schema`) its JSON or metadata must meet."""

    name: str
    what: str
    version: int = 1
    legacy: tuple[str | None, ...] = ()
    schema: dict | None = None

    def stamp(self) -> dict:
        return {"format": self.name, "version": self.version}

    def check(self, values, path: str | Path) -> None:
        """Refuse ``values`` (a file's JSON or metadata) unless it carries this marker at this version and meets
        the schema."""
        if not isinstance(values, dict):
            raise ValueError(f"{path} is not {self.what} (it holds a {type(values).__name__}, not an object)")
        found = values.get("format")
        if found not in self.legacy:
            if found != self.name:
                raise ValueError(f"{path} is not {self.what} (format marker {found!r}, expected {self.name!r})")
            if values.get("version") != self.version:
                raise ValueError(f"{path} is {self.what} of format version {values.get('version')!r}; this "
                                 f"bayesprune reads version {self.version}")
        try:
            validate(values, self.schema or {})
        except SchemaError as err:
            raise self.damaged(path, err) from None

    def damaged(self, path: str | Path, what_is_wrong) -> ValueError:
        """The error for a file of this format that holds something it should not."""
        return ValueError(f"{path} is a damaged {self.what.removeprefix('a ')}: {what_is_wrong}")


def write_json(path: str | Path, form: FileFormat, values: dict) -> None:
    """Write ``values`` with ``form``'s marker, atomically."""
    atomic_write_json(path, form.stamp() | values)


def read_json(path: str | Path, form: FileFormat) -> dict:
    """A JSON file :func:`write_json` wrote with ``form``; anything else raises ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not {form.what} (not a JSON file: {err})") from err
    form.check(values, path)
    return values


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], form: FileFormat,
                 metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; ``form``'s marker and ``metadata`` are stored as JSON in its header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"bayesprune": json.dumps(form.stamp() | (metadata or {}))})


def read_metadata(path: str | Path, form: FileFormat) -> dict:
    """The checked metadata of a file :func:`save_tensors` wrote with ``form``, from its header alone; a foreign
    or damaged file raises ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(path, "pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err
    if "bayesprune" not in header:
        raise ValueError(f"{path} is a safetensors file but was not written by bayesprune")
    try:
        metadata = json.loads(header["bayesprune"])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} has damaged bayesprune metadata ({err})") from err
    form.check(metadata, path)
    return metadata


def load_tensors(path: str | Path, form: FileFormat) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file :func:`save_tensors` wrote with ``form``; a foreign or corrupt file raises ValueError."""
    metadata = read_metadata(path, form)
    try:
        return load_file(path), metadata
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err


@contextlib.contextmanager
def atomic_directory(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory that replaces ``path`` only if the block succeeds.

    Without ``overwrite``, ``path`` is claimed at once (an empty folder made in its place): a second
    writer is refused when it starts, and nothing that exists is ever replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        try:
            path.mkdir()
        except FileExistsError:
            raise FileExistsError(f"{path} already exists; choose another --out or remove it") from None
    remove_stale_partials(path)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f"{_partial_prefix(path)}{os.getpid()}-"))
        try:
            yield tmp
            if overwrite and path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)  # onto the empty claim
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        if not overwrite:
            with contextlib.suppress(OSError):
                path.rmdir()  # the claim, if nothing else came of it
        raise


@contextlib.contextmanager
def claimed_file(path: str | Path):
    """Claim ``path`` for a file written later (an empty file made in its place at once, so that a second
    writer is refused when it starts); the claim is removed if the block fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; choose another path or remove it") from None
    try:
        yield path
    except BaseException:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()
        raise

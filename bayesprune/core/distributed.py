"""Data-parallel fits on an existing launcher: ``torchrun`` or ``accelerate launch``.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address;
:func:`initialise` joins the process group they describe (gloo on CPU, NCCL on CUDA).
A fit then wraps its ELBO module in ``DistributedDataParallel``: every rank draws the
same cost, mini-batch and gates (the seeds are per step), scores its share of the
mini-batch, and the averaged gradients are those of the whole mini-batch. Only rank
0 writes files. A fit of several chains instead gives each rank whole chains
(:func:`solo` while it fits one), and gathers them when all are done (:func:`gather`).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process was started by a launcher with more than one process."""
    return launched_processes() > 1


def check_batch(batch_size: int, parts: int = 1, chains: int = 1) -> None:
    """Refuse, before anything is loaded, a mini-batch the launched processes cannot share evenly, or a process's
    windows that cannot be split into ``parts`` (costs per step). With several chains, each process fits whole
    chains and holds the whole mini-batch."""
    processes = launched_processes()
    _check_split(batch_size, processes)
    check_parts(batch_size // processes if chains == 1 else batch_size, parts)


def check_parts(windows: int, parts: int) -> None:
    """Refuse ``parts`` costs per step when a process holds fewer ``windows`` of each mini-batch."""
    if parts > windows:
        raise ValueError(f"cost.per_step={parts} splits each step's mini-batch into parts, and a process holds "
                         f"{windows} window(s) of it; lower cost.per_step or raise the batch size")


_solo = False  # set while this process fits a chain of its own


@contextlib.contextmanager
def solo():
    """Within the block this process works alone: no collectives, and it writes its files as the first would."""
    global _solo
    before, _solo = _solo, True
    try:
        yield
    finally:
        _solo = before


def check_chains(chains: int, processes: int | None = None) -> None:
    """Refuse, before anything is loaded, several chains too few for every launched process to fit one."""
    processes = launched_processes() if processes is None else processes
    if 1 < chains < processes:
        raise ValueError(f"{chains} chains on {processes} processes would leave processes without a chain; fit "
                         f"at least {processes} chains, or one chain (data-parallel)")


def active() -> bool:
    return not _solo and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def initialise(device: str | None) -> str | None:
    """Join the launcher's process group (if launched and not joined yet); returns this rank's device."""
    if not launched():
        return device
    cuda = device is not None and device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda and ":" not in device:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def finish() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(batch: torch.Tensor) -> torch.Tensor:
    """This rank's part of a mini-batch of indices (every rank holds the same mini-batch)."""
    _check_split(batch.numel(), world_size())
    return batch[rank()::world_size()]


def _check_split(windows: int, processes: int) -> None:
    if windows % processes:
        raise ValueError(f"a mini-batch of {windows} windows does not split evenly over {processes} processes; "
                         "choose a batch size that is a multiple of it")


def mean(values: torch.Tensor) -> torch.Tensor:
    """The average of ``values`` over the ranks (itself when alone)."""
    if not active():
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def gather(value) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank (``[value]`` when alone)."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` under ``DistributedDataParallel`` when several processes fit together."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in module.parameters() if p.requires_grad), torch.device("cpu"))
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None,
                                   broadcast_buffers=False)

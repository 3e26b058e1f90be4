"""Data-parallel runs with ``torch.distributed``: who am I, set up, sync, launch.

``ftq run`` becomes data-parallel when started by ``torchrun`` (or by
``ftq run --nproc N``, which starts ``torchrun`` itself): the launcher sets
``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, :func:`process_group` joins the
group (NCCL when the run trains on GPUs, gloo on CPUs), the trainer wraps the
model in DDP and takes its rank's slice of every global batch, and only rank
0 writes checkpoints, the artifact and the report while the others wait at a
barrier.

torch is imported inside functions so that ``ftq --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

__all__ = [
    "Rank",
    "current_rank",
    "process_group",
    "is_distributed",
    "barrier",
    "all_reduce_mean",
    "sync_observers",
    "torchrun_command",
    "launch",
]

#: How long ranks wait for each other at a barrier: rank 0 evaluates and saves
#: while the others wait, which can take many minutes on a real model.
BARRIER_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Rank:
    """This process's place in a run, as the launcher set it in the environment."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current_rank() -> Rank:
    """The rank from ``torchrun``'s environment variables (rank 0 of 1 when absent)."""
    from .errors import UsageError

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UsageError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers; start distributed runs with torchrun or ftq run --nproc"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK {rank} is not within WORLD_SIZE {world}; start distributed runs with torchrun or ftq run --nproc")
    return Rank(rank, world, local)


def is_distributed() -> bool:
    """Whether a process group is up (this process is one rank of several)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1




@contextlib.contextmanager
def process_group(*, use_cuda: bool) -> Iterator[Rank]:
    """Join the process group the launcher described, and leave it on exit.

    Does nothing for a single process, or when a group is already up (a
    caller that set one up owns it).  With ``use_cuda`` (and a GPU) each rank
    takes GPU ``LOCAL_RANK`` and CUDA tensors go through NCCL, CPU tensors
    through gloo (so a CPU-only trainer still works); otherwise gloo alone.
    """
    import torch
    import torch.distributed as dist

    info = current_rank()
    if info.world_size == 1 or dist.is_initialized():
        yield info
        return
    backend = "gloo"
    if use_cuda and torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend=backend, timeout=BARRIER_TIMEOUT)
    try:
        yield info
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    import torch.distributed as dist

    if is_distributed():
        dist.barrier()


def all_reduce_mean(value: float, device) -> float:
    """The mean of a Python float over all ranks (itself when not distributed)."""
    import torch
    import torch.distributed as dist

    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def sync_observers(model) -> int:
    """All-reduce the range of every torch.ao min/max observer in ``model``; return how many.

    PyTorch's eager QAT leaves each rank's observers with the range of the
    data that rank saw (pytorch/pytorch#85627), so ranks would convert to
    different int8 models.  This takes, for every ``MinMaxObserver``,
    ``MovingAverageMinMaxObserver`` and their per-channel variants (also those
    inside ``FakeQuantize``), the minimum of ``min_val`` and the maximum of
    ``max_val`` over all ranks: every rank ends with the range covering all
    ranks' data and computes the same scale and zero point.  For the moving
    averages this is the widest of the ranks' averages, not an average.

    Call it at the same point on every rank (before convert, or whenever
    observers are frozen).  Observers that have seen no data yet (empty
    per-channel buffers) are skipped; that state is the same on all ranks.
    """
    import torch.distributed as dist
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    observers = [m for m in model.modules() if isinstance(m, (MinMaxObserver, PerChannelMinMaxObserver))]
    if not is_distributed():
        return len(observers)
    for observer in observers:
        if observer.min_val.numel() == 0:
            continue
        dist.all_reduce(observer.min_val, op=dist.ReduceOp.MIN)
        dist.all_reduce(observer.max_val, op=dist.ReduceOp.MAX)
    return len(observers)


def torchrun_command(nproc: int, args: Sequence[str], *, python: str | None = None) -> list[str]:
    """The ``torchrun`` command that runs ``ftq ARGS`` in ``nproc`` processes on this machine."""
    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={nproc}",
        "-m", "ftq_core.cli", *args,
    ]


def launch(nproc: int, args: Sequence[str]) -> int:
    """Run ``ftq ARGS`` under ``torchrun`` with ``nproc`` processes; return its exit code.

    ``torch.distributed.run`` starts the workers, sets their rank variables,
    and stops all of them when one fails.
    """
    return subprocess.call(torchrun_command(nproc, args))

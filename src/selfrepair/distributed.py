"""Many processes: one measurement sharded over the ranks of a ``torchrun`` (or ``accelerate
launch``) job.

Such a launcher starts N copies of the same command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`world` reads
them and initialises :mod:`torch.distributed` once (``gloo`` for CPU models, ``nccl`` for CUDA
ones, each rank on GPU ``LOCAL_RANK``); without a launcher it is a world of one and nothing is
initialised. A measurement that shards (:func:`selfrepair.sweep.run_sweep`) gives rank ``r`` the
contiguous rows :meth:`World.shard` and merges exactly: sums and counts are added, exact top-k
selections are taken over every rank's candidates, per-token values are gathered. Only rank 0
writes results (:class:`selfrepair.measure.Cache`); the key does not depend on the world size,
the result's ``meta["run"]["world_size"]`` records it.

Gathers go through ``all_gather_object`` of CPU tensors, so the same code runs on both backends
(on NCCL the pickled bytes travel through each rank's current GPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


def launched() -> bool:
    """Whether this process is one of several started by a launcher (``WORLD_SIZE > 1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@dataclass(frozen=True)
class World:
    """This process's rank among ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that shows progress and writes results."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Rows ``lo:hi`` of ``n`` this rank measures: contiguous, in rank order, sizes differing
        by at most one (a rank may get none when ``n < size``)."""
        return self.rank * n // self.size, (self.rank + 1) * n // self.size

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return all(self.gather(bool(flag)))

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def world(device: torch.device | str | None = None) -> World:
    """The current world, initialising the process group from the launcher's environment on
    first use (backend from ``device``: ``nccl`` for CUDA, else ``gloo``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    if not launched():
        return World()
    if not dist.is_available():  # pragma: no cover - every supported torch build has it
        from .errors import InputError
        raise InputError("this torch build has no torch.distributed: run with one process")
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
    dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def close() -> None:
    """Tear the process group down (end of a command), if one was started."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["World", "close", "launched", "local_rank", "world"]

"""This process's place in a run: rank, world size, local rank and device, from the launcher's environment.

Owns: ``current()``, the one place that works out whether privtune runs as one process or as one of several
(``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), initializes the
``torch.distributed`` process group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA) and chooses the device
(CUDA device ``LOCAL_RANK`` under a launcher, else ``cuda`` when there is a GPU, else the CPU). Calling it again
reuses the process group, so every stage may ask. ``ProcessState.barrier`` and ``main_first`` are the two
synchronizations the stages need.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ProcessState:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes shared files and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait for every process (nothing to wait for in a single process)."""
        if self.distributed:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. prepares shared data); the others run it once rank 0 is done."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def current() -> ProcessState:
    """This process's state; initializes the process group on the first call under a multi-process launch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    launched = "LOCAL_RANK" in os.environ
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda and launched:
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cuda" if cuda else "cpu")
    if world <= 1:
        return ProcessState(rank=0, world_size=1, local_rank=0, device=device)
    if device.index is not None:
        torch.cuda.set_device(device)  # NCCL's collectives run on this process's own GPU
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return ProcessState(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                        device=device)

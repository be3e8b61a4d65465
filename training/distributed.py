"""Data-parallel training on torch.distributed: `torchrun --nproc_per_node=N` starts N copies of a stage.

Every rank walks the same shuffled order and draws the same augmentations for the whole global batch,
then takes its own slice of it, so N processes see what one process with the same batch size sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main rank logs to MLflow, prints progress and writes outputs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch[self.rank :: self.world_size] if self.enabled else batch

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def from_main(self, values: torch.Tensor) -> torch.Tensor:
        """The main rank's `values` on every rank (so that every rank takes the same decisions)."""
        if self.enabled:
            dist.broadcast(values, src=0)
        return values


SINGLE_PROCESS = Distributed()


@contextlib.contextmanager
def process_group() -> Iterator[Distributed]:
    """Join the group torchrun describes in the environment (NCCL on GPUs, gloo on CPUs); a plain
    `python` run is rank 0 of 1 and starts nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE_PROCESS
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())
    finally:
        dist.destroy_process_group()

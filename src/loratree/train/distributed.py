"""torchrun support: one process per device, gloo on CPU and nccl on CUDA. Rank 0 writes."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Dist", "init", "shutdown"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: float) -> float:
        """The sum of ``value`` over all processes (as float64)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())


def init(device: str | None = None) -> Dist:
    """Join the torchrun job described by the environment, or run alone without one.

    ``device``: "cpu", "cuda" or "cuda:N"; None picks CUDA when it is present. Under
    torchrun a CUDA process takes its local rank's GPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but torch sees no CUDA device")
    if world == 1:
        return Dist(0, 1, torch.device(device or ("cuda" if cuda else "cpu")))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def shutdown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

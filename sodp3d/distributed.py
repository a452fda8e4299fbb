"""Several processes training one model, torchrun style (torch.distributed).

``torchrun --nproc_per_node=N -m sodp3d.cli pretrain ...`` starts N processes with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; a plain ``sodp3d pretrain`` is world
size 1 and takes the same code path without a process group. Backend: NCCL when the
device is CUDA (one GPU per process, ``cuda:<LOCAL_RANK>``), gloo on CPU.

Rank 0 alone writes files, logs and shows progress; every rank computes the same global
batch's random draws and keeps its own rows (``rows``), so N processes take exactly the
step one process takes with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from sodp3d.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """This rank's rows of a global batch (None: all of them, world size 1)."""
        if self.world == 1:
            return None
        if batch_size % self.world:
            raise UserError(f"batch_size={batch_size} does not split over {self.world} processes; "
                            f"use a multiple of {self.world}")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def ranks_from_env() -> Ranks:
    """The launcher's ranks (torchrun sets them), or world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Ranks(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(ranks: Ranks, device: torch.device) -> torch.device:
    """Joins the process group (world size > 1) and returns this rank's device."""
    if ranks.world == 1:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def stop(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def broadcast(ranks: Ranks, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if ranks.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if ranks.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean(ranks: Ranks, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the ranks (a copy; gradients are not involved)."""
    if ranks.world == 1:
        return value.detach()
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / ranks.world


class LossModule(torch.nn.Module):
    """The policy's loss as a module's forward, so that DistributedDataParallel can wrap
    it: DDP averages the gradients of the ranks' row means, which is the gradient of the
    global batch's mean when the ranks hold equal rows."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None, rows: slice | None) -> torch.Tensor:
        return self.policy.compute_loss(batch, generator=generator, rows=rows)


def loss_module(ranks: Ranks, policy: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module = LossModule(policy)
    if ranks.world == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

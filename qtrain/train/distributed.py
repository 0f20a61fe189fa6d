"""Distributed data parallel training on torch.distributed (launched by torchrun).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and the rendezvous variables; `from_env()` joins
the process group (NCCL on CUDA, gloo on CPU) and each rank trains on its slice of every
global batch (the data loader shards by rank). Gradients are averaged by
DistributedDataParallel, so every replica takes the same base step; SR and stochastic BC
draw from generators seeded identically on every rank, so the rounding is identical too and
replicas never drift apart. Only rank 0 writes files.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # None: the trainer chooses

    @classmethod
    def single(cls) -> DistributedContext:
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 300.0) -> DistributedContext:
        """Join the process group torchrun describes; a single process when there is none."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls.single()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device("cpu")
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around `model` when distributed, else `model` itself."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum of `value` over ranks (itself when not distributed)."""
        if not self.enabled:
            return value
        out = value.clone()
        torch_dist.all_reduce(out)
        return out

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()

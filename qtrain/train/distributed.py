"""Distributed data parallel training on torch.distributed (launched by torchrun).

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE and the rendezvous variables;
`from_env()` joins the process group (NCCL on CUDA, gloo on CPU) and each rank trains on its
slice of every global batch (the data loaders shard by rank). With world size W and global
batch B, rank r computes the mean loss over its B/W images and DistributedDataParallel
averages the gradients, so every replica takes the base step of the whole batch:

    g = (1/W) Σ_r ∇ f̃_r(w) = ∇ (1/B) Σ_{i ∈ batch} ℓ_i(w)

SR and stochastic BC draw from generators seeded identically on every rank and are applied
to identical weights, so the rounding is identical too and replicas never drift apart. Only
rank 0 writes files; what rank 0 reads (an existing checkpoint) is broadcast, so ranks on
nodes without a shared file system agree. BatchNorm statistics are per rank, as in every
DDP recipe: the running statistics of rank 0 are broadcast before each forward pass.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

from qtrain.base.errors import NamesSettings, UserError

ROLL_CALL_MAX_S = 10.0  # how long survivors of a failed collective wait for each other


class RankFailure(NamesSettings, RuntimeError):
    """A collective failed because another rank died or stopped responding."""


@dataclass
class DistributedContext:
    """This process's place in the job: rank r of `world_size`, on `device`."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device | None = None  # None: the trainer chooses
    timeout_s: float = 300.0

    @classmethod
    def single(cls) -> DistributedContext:
        return cls()

    @classmethod
    def from_env(cls, device: str = "auto", timeout_s: float = 300.0) -> DistributedContext:
        """Join the process group torchrun describes; a single process when there is none.

        ``device`` is the run's device setting: 'auto' uses CUDA (NCCL) when available, 'cpu'
        forces gloo. A collective that waits longer than ``timeout_s`` seconds fails.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls.single()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        dev = _rank_device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(
                backend="nccl" if dev.type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=timeout_s),
            )
        return cls(rank, world_size, local_rank, local_world_size, dev, timeout_s)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def check_divides(self, name: str, global_batch: int) -> None:
        """ValueError unless the world size divides ``global_batch`` (config key ``name``)."""
        if global_batch % self.world_size:
            multiple = -(-global_batch // self.world_size) * self.world_size
            raise UserError(
                f"{name} {global_batch} is the global batch, which {self.world_size} processes "
                f"cannot share evenly; set {name} to a multiple of {self.world_size} "
                f"(e.g. {multiple}) or launch a number of processes that divides it"
            )

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

    def all_max(self, value: int) -> int:
        """The largest of the ranks' integers ``value``."""
        if not self.enabled:
            return value
        out = torch.tensor(value, dtype=torch.int64, device=self.device)
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.MAX)
        return int(out)

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable object, e.g. a checkpoint dict) on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) into every rank's `module`."""
        if self.enabled:
            for buffer in module.buffers():
                torch_dist.broadcast(buffer, src=0)

    @contextlib.contextmanager
    def naming_failed_ranks(self):
        """Turn a failed collective into a `RankFailure` naming the ranks that are gone.

        A rank that died closes its connections and one that hangs lets collectives time
        out (``timeout_s``); either way the survivors' collective raises. The survivors then
        hold a roll call through the rendezvous store, and the ranks that do not answer
        within min(timeout_s, 10 s) are the ones that failed.
        """
        try:
            yield
        except RuntimeError as error:
            if not self.enabled or isinstance(error, RankFailure) or not _is_comm_error(error):
                raise
            missing = self.unanswered_roll_call(min(self.timeout_s, ROLL_CALL_MAX_S))
            if missing is None:
                who = "the rendezvous store is gone too, so the failed rank is unknown"
            elif missing:
                ranks = ", ".join(str(r) for r in missing)
                who = f"rank {ranks} did not answer: it died or hangs; see its log"
            else:
                who = "every rank answered, so a connection failed rather than a rank"
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise RankFailure(
                f"rank {self.rank} of {self.world_size}: a collective operation failed "
                f"({first_line[:200]}); {who}; collectives give up after {{dist_timeout}} s",
                dist_timeout=f"dist_timeout={self.timeout_s:g}",
            ) from error

    def unanswered_roll_call(self, wait_s: float) -> list[int] | None:
        """Ranks that do not sign in at the store within ``wait_s``; None without a store."""
        # torchrun's elastic restarts reuse the store, so keys carry the restart count.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"qtrain/roll-call/{restart}/"
        try:
            # The default group's store is the rendezvous store; torch has no public getter.
            store = torch_dist.distributed_c10d._get_default_store()
            store.set(f"{prefix}{self.rank}", "here")
            missing = [r for r in range(self.world_size) if r != self.rank]
            deadline = time.monotonic() + wait_s
            while True:
                missing = [r for r in missing if not store.check([f"{prefix}{r}"])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(0.05)
        except (RuntimeError, ValueError):
            return None

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def _rank_device(device: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK when the run's ``device`` setting asks for CUDA, else the CPU."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise UserError(
            f"local rank {local_rank} needs GPU {local_rank} but {visible} GPUs are visible; "
            f"launch at most {visible} processes per node (torchrun's --nproc-per-node) or "
            "use {device}",
            device="device=cpu",
        )
    return torch.device("cuda", local_rank)


def _is_comm_error(error: RuntimeError) -> bool:
    """Whether ``error`` comes from the communication backend rather than from our code."""
    # gloo reports lost peers and timeouts as plain RuntimeErrors whose text names gloo.
    return isinstance(error, torch_dist.DistError) or "gloo" in str(error).lower()

"""Multi-GPU / multi-node training under ``torchrun`` (DistributedDataParallel).

``torchrun --nproc_per_node=4 -m surgery ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them (NCCL on CUDA, gloo on
CPU). Without them everything runs as a single process. Only rank 0 writes files; the run directory
must be on a file system every node sees for ``--resume``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, Sampler

log = logging.getLogger("surgery.train")

__all__ = [
    "DistInfo",
    "ShardSampler",
    "all_reduce_sum",
    "barrier",
    "cleanup_distributed",
    "init_distributed",
    "resolve_device",
    "train_sampler",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from exc


def init_distributed(device: str = "auto", backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (once); single process otherwise.

    An already initialised default group (e.g. set up by the caller) is reused as is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0), dist.get_backend())
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)
    log.info("distributed: rank %d/%d (local %d, %s)", info.rank, info.world_size, local_rank, backend)
    return info


def cleanup_distributed() -> None:
    """Leave the process group (call once at the very end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(device: str, info: DistInfo) -> torch.device:
    """``"auto"`` → this rank's GPU if there is one, else CPU; ``"cuda"`` → ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        if d.index is None:
            d = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    return d


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for chaining)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's value on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap_ddp(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when running distributed, else ``model``."""
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def train_sampler(dataset: Dataset, info: DistInfo, *, seed: int, shuffle: bool = True) -> DistributedSampler:
    """Per-epoch reshuffled sampler (``set_epoch``), sharded over ranks; also used single-process.

    With one replica it is a seeded permutation of the whole set, so a resumed run sees the same
    order in every epoch as an uninterrupted one.
    """
    return DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed, drop_last=False
    )


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: an evaluation shard without DistributedSampler's padding."""

    def __init__(self, n: int, info: DistInfo) -> None:
        self.n = n
        self.info = info

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.info.rank, self.n, self.info.world_size))

    def __len__(self) -> int:
        return len(range(self.info.rank, self.n, self.info.world_size))

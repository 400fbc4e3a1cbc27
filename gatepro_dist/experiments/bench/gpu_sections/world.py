"""The trainer's process groups, for a world of one process on one device.

``gatepro-train`` joins a process group only when there is more than one process
(``cluster.topology.init_distributed``); on GPUs it uses the multi-backend ``cpu:gloo,cuda:nccl``
(device tensors over NCCL, host control messages over gloo), on CPUs ``gloo``. Here the same backend
joins a world of one, so that the trainer's group code (``train.parallel.build_parallel_groups``: the
(edp, ep) device mesh), DCP checkpoints and the collectives run on the production group. One GPU
allows no more than one NCCL rank: two processes on one device is not a valid NCCL communicator, so
no section runs ep > 1 (the CPU tests cover ep = 2 and 4 with gloo).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from ....train.parallel import ParallelGroups, build_parallel_groups, close_process_groups


def production_backend(device: torch.device) -> str:
    """What ``init_distributed`` chooses for a job on ``device``."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def cuda_device() -> torch.device:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


@contextmanager
def world_of_one(device: torch.device, backend: str | None = None, dp_shard: bool = False) -> Iterator[ParallelGroups]:
    """Join a one-process default group (``backend``: the trainer's by default), build the trainer's
    groups on it, and close every group afterwards (also when the body fails)."""
    if dist.is_initialized():
        raise RuntimeError("a default process group exists already; world_of_one makes its own")
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)  # as cluster.topology.pick_device does for its local rank
    # No rendezvous for one process: an in-memory store (the trainer's env:// store holds nothing more).
    dist.init_process_group(backend or production_backend(device), store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield build_parallel_groups(1, device.type, dp_shard)
    finally:
        close_process_groups()

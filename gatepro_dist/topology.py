"""Learn this process's place in the job from the launcher's environment, and join the job.

Launch concerns only: nothing here knows about models or training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    source: str  # which launcher's variables were used


def detect_topology(environ=None) -> Topology:
    """torchrun's variables, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Topology(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", 1)), "torchrun")
    return Topology(0, 1, 0, 1, "single")


def pick_device(topology: Topology, backend: str) -> torch.device:
    if backend == "nccl" or (backend == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(topology.local_rank)
        return torch.device("cuda", topology.local_rank)
    return torch.device("cpu")


def init_distributed(topology: Topology, backend: str, timeout_s: float) -> torch.device:
    """Join the default process group (when there is more than one process); return the device."""
    device = pick_device(topology, backend)
    if topology.world_size > 1 and not dist.is_initialized():
        chosen = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(chosen, rank=topology.rank, world_size=topology.world_size,
                                timeout=timedelta(seconds=timeout_s))
    return device

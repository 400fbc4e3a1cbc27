"""The one place where process groups are built.

World = dp x ep. EP groups are consecutive blocks of ``ep`` ranks; expert-data-parallel (EDP)
groups join the ranks at the same position inside their EP group. Every rank reads its own part
of each global batch (the EP dimension is carved out of data parallelism, as in DeepSpeed and
Megatron), so dense gradients are averaged over the world and expert gradients over EDP.

Group handles follow ``comm``'s convention: ``None`` means a group of one (no communication).
"""
from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    world_size: int
    rank: int
    ep: int
    ep_rank: int
    dp: int  # expert-data-parallel size = world_size // ep
    dp_rank: int
    world_group: object
    ep_group: object
    edp_group: object
    mesh: object  # a (dp, ep) DeviceMesh for checkpoint resharding, or None for one process
    dp_shard: bool = False  # parameters sharded with FSDP2 (train/sharding.py) rather than replicated

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def single_process_groups() -> ParallelGroups:
    return ParallelGroups(1, 0, 1, 0, 1, 0, None, None, None, None)


def build_parallel_groups(ep: int, device_type: str = "cpu", dp_shard: bool = False) -> ParallelGroups:
    """Build the (dp, ep) layout on an initialised default process group (collective call).
    ``dp_shard`` records that parameters will be sharded over it (``parallel.dp_shard``)."""
    if not dist.is_initialized():
        if ep != 1:
            raise ValueError(f"parallel.ep={ep} needs {ep} or more processes; launch with torchrun")
        return single_process_groups()
    from torch.distributed.device_mesh import init_device_mesh

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % ep:
        raise ValueError(f"parallel.ep={ep} does not divide the world size {world}; choose a divisor")
    dp = world // ep
    mesh = init_device_mesh(device_type, (dp, ep), mesh_dim_names=("edp", "ep"))
    return ParallelGroups(
        world_size=world,
        rank=rank,
        ep=ep,
        ep_rank=rank % ep,
        dp=dp,
        dp_rank=rank // ep,
        world_group=dist.group.WORLD if world > 1 else None,
        ep_group=mesh.get_group("ep") if ep > 1 else None,
        edp_group=mesh.get_group("edp") if dp > 1 else None,
        mesh=mesh,
        dp_shard=dp_shard,
    )


def close_process_groups() -> None:
    """Destroy every process group and free them while the interpreter is fully alive.

    ``destroy_process_group`` only unregisters the groups; a gloo group's worker threads live
    until its last reference goes. A worker that outlives the interpreter's finalisation and
    still holds a finished collective's tensor needs the GIL to free it, and aborts the process
    ("terminate called without an active exception", a rank killed by SIGABRT after training
    finished). So nothing of ours may keep a group alive (see ``OverlappedGradReducer``), and a
    collection here frees what a reference cycle still holds.
    """
    deepspeed_comm = sys.modules.get("deepspeed.comm")  # loaded by train.backend=deepspeed only
    if deepspeed_comm is not None and deepspeed_comm.is_initialized():
        deepspeed_comm.destroy_process_group()  # also drops DeepSpeed's module-level group handles
    elif dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def exit_process(code: int) -> NoReturn:
    """End the process with ``code`` after ``close_process_groups``.

    Normally through ``sys.exit`` (atexit handlers, buffered files and the interpreter's
    finalisation run). If gloo threads are still alive, something outside this project holds a
    group (DeepSpeed's engine does, in C++), and finalising with them alive can abort the
    process (``close_process_groups``): then flush and leave at once with the same code.
    """
    if live_gloo_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def live_gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux): empty once every gloo group is freed."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as fh:
                name = fh.read().strip()
        except OSError:  # the thread ended while we looked
            continue
        if "gloo" in name:
            names.append(name)
    return sorted(names)

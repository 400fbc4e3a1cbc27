"""Section ``collectives``: every kind of collective our code calls, on the trainer's group
(``cpu:gloo,cuda:nccl``, a world of one: one GPU allows one NCCL rank, see world.py).

``moe.comm``'s wrappers skip the collective for a group of one, so the MoE layer and the trainer at
world 1 never call one. To run them anyway, this section calls what the wrappers wrap, directly on
the world group: the autograd all-to-all with explicit (uneven-ready) splits, including zero rows;
the router's all-gather whose backward is a reduce-scatter; a device all-reduce, synchronous and
asynchronous (the overlapped gradient reduction); and, in host memory over gloo, the all-gather of
token counts and the MAX all-reduce of the preemption flag. At world 1 each result equals its input:
what this checks is that every call reaches the right backend with the right dtypes and returns,
not the arithmetic between ranks (which the CPU tests check at world 2 and 4).
"""
from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from ....moe import comm
from .world import cuda_device, world_of_one


def _all_to_all(device, rows: int) -> bool:
    world = dist.group.WORLD
    x = torch.randn(rows, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = comm._AllToAll.apply(x, [rows], [rows], world)
    grad = torch.randn_like(out)
    out.backward(grad)
    return bool(torch.equal(out, x.detach()) and torch.equal(x.grad, grad))


def _all_gather_rows(device) -> bool:
    world = dist.group.WORLD
    w = torch.randn(8, 32, device=device, requires_grad=True)
    full = comm._AllGatherRows.apply(w, world)
    grad = torch.randn_like(full)
    full.backward(grad)  # a reduce-scatter where the device's backend has one
    return bool(torch.equal(full, w.detach()) and torch.equal(w.grad, grad))


def _device_all_reduce(device, async_op: bool) -> bool:
    t = torch.arange(1000, device=device, dtype=torch.float32)
    work = dist.all_reduce(t, async_op=async_op)
    if async_op:
        work.wait()
    return bool(torch.equal(t, torch.arange(1000, device=device, dtype=torch.float32)))


def _host_all_gather_ints() -> bool:
    world = dist.group.WORLD
    local = torch.tensor([3, 0, 7], dtype=torch.long, device=comm.host_device(world))
    out = torch.empty(3, dtype=torch.long, device=local.device)
    comm._all_gather_flat(out, local, group=world)
    return out.tolist() == [3, 0, 7] and out.device.type == "cpu"


def _host_max() -> bool:
    flag = torch.tensor([10], dtype=torch.int64)  # the preemption agreement's flag, in host memory
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 10


def check_collectives(device: torch.device) -> dict:
    checks = {
        "all_to_all_single, autograd, bf16 rows": lambda: _all_to_all(device, 37),
        "all_to_all_single, zero rows (an idle rank)": lambda: _all_to_all(device, 0),
        "all_gather rows, reduce-scatter in backward": lambda: _all_gather_rows(device),
        "all_reduce on the device": lambda: _device_all_reduce(device, False),
        "all_reduce on the device, async": lambda: _device_all_reduce(device, True),
        "host all_gather of counts (gloo)": _host_all_gather_ints,
        "host MAX all_reduce (gloo)": _host_max,
        "barrier": lambda: dist.barrier() is None,
    }
    results = {}
    with world_of_one(device) as groups:
        backend = dist.get_backend_config()
        host = str(comm.host_device(dist.group.WORLD))
        for name, check in checks.items():
            try:
                results[name] = "pass" if check() else "wrong values"
            except Exception as err:
                results[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                traceback.print_exc()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        mesh = groups.mesh.shape if groups.mesh is not None else None
    expected = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    return {"backend": backend, "world_size": 1, "mesh_edp_ep": list(mesh) if mesh else None,
            "host_messages_on": host, "checks": results,
            "note": "world 1: one GPU allows one NCCL rank; values equal inputs, backends and dtypes are what is checked",
            "passed": expected in backend and host == "cpu" and all(v == "pass" for v in results.values())}


def collectives(options: dict, note) -> dict:
    return check_collectives(cuda_device())

"""Differentiable collectives used by the MoE layer.

``group=None`` means *no communication* (a single rank), not torch's WORLD: the same code path
runs at ep=1 without touching torch.distributed. Every function here is a no-op copy then.

Devices (docs/training.md, "Process groups"): on GPUs the groups are ``cpu:gloo,cuda:nccl``. A
collective runs where its tensor lives -- data the device made (gradients, counts, activations)
goes over NCCL on that device, and nothing here moves it; the few *host* values the engine must
exchange (how many tokens each rank holds, a preemption flag) go over gloo in host memory with
the ``host_*`` functions, so neither kind waits for the other. Which collective to use is chosen
from the tensor's device, never from ``dist.get_backend`` (a multi-backend group's name is
``"cpu:gloo,cuda:nccl"``, not ``"nccl"``).
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..cluster import faults

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); torch
# 2.11 (the GPU machine's) has only the old ones: use whichever this version has.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
# NCCL always has reduce-scatter; gloo has it from torch 2.13 on (DESIGN §4). Older gloo: all-reduce.
GLOO_HAS_REDUCE_SCATTER = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)


_traffic: Counter | None = None  # set only inside count_traffic(); measurement, not model state


@contextmanager
def count_traffic():
    """Tally the bytes this rank sends to other ranks, by kind, for the collectives below.

    Bytes are the algorithm's payload: all-gather sends our shard to every other rank;
    all-to-all sends the rows addressed to other ranks; a reduce-scatter sends (w-1)/w of the
    tensor and an all-reduce twice that (ring algorithms). The communication model in
    ``comm_model`` predicts the same quantities from the configuration.
    """
    global _traffic
    previous, _traffic = _traffic, Counter()
    try:
        yield _traffic
    finally:
        _traffic = previous


def _count(kind: str, nbytes: float) -> None:
    if _traffic is not None:
        _traffic[kind] += int(nbytes)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def can_reduce_scatter(device: torch.device) -> bool:
    """Whether the backend that serves ``device`` has reduce-scatter (chosen by device, not by name)."""
    return device.type != "cpu" or GLOO_HAS_REDUCE_SCATTER


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


class _AllGatherRows(torch.autograd.Function):
    """Forward: concatenate every rank's rows. Backward: each rank gets the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, local_RD: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        full = local_RD.new_empty((world * local_RD.shape[0],) + tuple(local_RD.shape[1:]))
        _count("router_all_gather", _nbytes(local_RD) * (world - 1))
        _all_gather_flat(full, local_RD.contiguous(), group=group)
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor):
        group = ctx.group
        world = dist.get_world_size(group)
        grad_full = grad_full.contiguous()
        rows = grad_full.shape[0] // world
        if can_reduce_scatter(grad_full.device):
            _count("router_grad_reduce", _nbytes(grad_full) * (world - 1) / world)
            grad_local = grad_full.new_empty((rows,) + tuple(grad_full.shape[1:]))
            _reduce_scatter_flat(grad_local, grad_full, group=group)
            return grad_local, None
        # gloo before torch 2.13 has no reduce_scatter: sum everywhere, keep our rows.
        _count("router_grad_reduce", 2 * _nbytes(grad_full) * (world - 1) / world)
        dist.all_reduce(grad_full, group=group)
        rank = dist.get_rank(group)
        return grad_full[rank * rows : (rank + 1) * rows].clone(), None


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t``: its local shard if ``t`` is a DTensor (parameters under
    ``parallel.dp_shard``), else ``t`` itself. Differentiable."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()


def all_gather_rows(local: torch.Tensor, group) -> torch.Tensor:
    """All-gather along dim 0 with autograd (backward is a reduce-scatter)."""
    if group_size(group) == 1:
        return local
    return _AllGatherRows.apply(local, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        faults.point("all_to_all")
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        _count_rows_to_others(x, input_splits, group)
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        faults.point("all_to_all")
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        _count_rows_to_others(grad_out, ctx.output_splits, ctx.group)
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group
        )
        return grad_in, None, None, None


def _count_rows_to_others(x: torch.Tensor, splits: list[int], group) -> None:
    if _traffic is not None and x.shape[0]:
        row_bytes = _nbytes(x) // x.shape[0]
        _count("token_all_to_all", (sum(splits) - splits[dist.get_rank(group)]) * row_bytes)


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """all_to_all_single with uneven splits along dim 0, differentiable."""
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, output_splits, input_splits, group)


def all_gather_counts(local_C: torch.Tensor, group) -> torch.Tensor:
    """Stack a small integer vector from every rank: [group_size, C] (no autograd)."""
    if group_size(group) == 1:
        return local_C.unsqueeze(0)
    flat = local_C.contiguous().reshape(-1)
    _count("counts", _nbytes(flat) * (group_size(group) - 1))
    out = flat.new_empty(group_size(group) * flat.numel())
    _all_gather_flat(out, flat, group=group)
    return out.view((group_size(group),) + tuple(local_C.shape))


def all_to_all_counts(send_RE: torch.Tensor, group) -> torch.Tensor:
    """Exchange per-destination count rows: row r goes to rank r; returns what each rank sent us."""
    if group_size(group) == 1:
        return send_RE.clone()
    recv = torch.empty_like(send_RE)
    _count("counts", _nbytes(send_RE) * (group_size(group) - 1) // group_size(group))
    dist.all_to_all_single(recv, send_RE.contiguous(), group=group)
    return recv


def all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    """In-place maximum over ``group`` (no autograd); a no-op for a single rank."""
    if group_size(group) > 1:
        _count("reduce", 2 * _nbytes(t) * (group_size(group) - 1) / group_size(group))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """In-place sum over ``group`` (no autograd); a no-op for a single rank."""
    if group_size(group) > 1:
        _count("reduce", 2 * _nbytes(t) * (group_size(group) - 1) / group_size(group))
        dist.all_reduce(t, group=group)
    return t


def host_device(group) -> torch.device:
    """Where host values travel on ``group``: the CPU when the group has a CPU backend (gloo, or
    ``cpu:gloo,cuda:nccl``); only a group made NCCL-only by someone else forces them through the
    GPU (correct, at the cost of a device round trip)."""
    if group is None:
        return torch.device("cpu")
    # e.g. "cpu:gloo,cuda:nccl" -> ["cpu", "cuda"]
    device_types = [entry.split(":")[0] for entry in dist.get_backend_config(group).split(",")]
    if "cpu" in device_types:
        return torch.device("cpu")
    if device_types[0] == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_types[0])


def host_all_reduce(values: list[float], group, op: str = "sum") -> list[float]:
    """Sum (or max) host numbers over ``group``, in fp64 host memory: a control message (see
    ``host_all_gather_ints``)."""
    local = torch.tensor(values, dtype=torch.float64, device=host_device(group))
    reduce = all_reduce_max if op == "max" else all_reduce_sum
    return reduce(local, group).cpu().numpy().tolist()


def host_all_gather_ints(values: list[int], group) -> list[list[int]]:
    """Every rank's ``values`` (host integers, e.g. token counts known from shapes): [rank][i].

    A control message in host memory over the group's CPU backend (gloo): no device tensor is
    made or read, so it costs no host-device synchronisation (``numpy()`` reads the host buffer
    that gloo filled; nothing was ever on the device).
    """
    if group_size(group) == 1:
        return [list(values)]
    local_C = torch.tensor(values, dtype=torch.long, device=host_device(group))
    return all_gather_counts(local_C, group).cpu().numpy().tolist()


def all_reduce_sum_async(t: torch.Tensor, group):
    """Start an in-place sum over ``group`` and return its handle (None for a single rank):
    the caller keeps computing (the rest of backward) and waits only when it needs the sum."""
    if group_size(group) == 1 or t.device.type == "cpu":
        # On CPU gloo and backward share the same cores, so there is little to overlap: reduce
        # now. Device tensors (NCCL) keep the async path.
        all_reduce_sum(t, group)
        return None
    _count("reduce", 2 * _nbytes(t) * (group_size(group) - 1) / group_size(group))
    return dist.all_reduce(t, group=group, async_op=True)

"""The process-group design (docs/training.md, "Process groups"), on real gloo groups.

On GPUs the groups are ``cpu:gloo,cuda:nccl``; here the same multi-backend form is built as
``cpu:gloo,cuda:gloo`` (no NCCL on this machine), which has the property that matters: its
``get_backend`` is not ``"gloo"`` or ``"nccl"`` but the whole string, so nothing in ``comm`` may
choose a branch from that name. The router gradient's reduce-scatter, "NCCL-only" before, runs
on gloo (torch >= 2.13) and is checked here by its result and by its traffic.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_on_ranks
from gatepro_dist.moe import comm


def _worker(rank: int, world: int, backend: str) -> dict:
    group = dist.new_group(list(range(world)), backend=backend)
    local_RD = torch.arange(2 * 3, dtype=torch.float32).view(2, 3).add(10 * rank).requires_grad_()
    upstream_ND = torch.arange(world * 2 * 3, dtype=torch.float32).view(world * 2, 3) * (rank + 1)
    with comm.count_traffic() as traffic:
        gathered_ND = comm.all_gather_rows(local_RD, group)
        (gathered_ND * upstream_ND).sum().backward()
    return {
        "backend": dist.get_backend(group),
        "gathered": gathered_ND.detach(),
        "grad": local_RD.grad,
        "traffic": dict(traffic),
        "host_device": str(comm.host_device(group)),
        "tokens": comm.host_all_gather_ints([5 + rank, rank], group),
        "mean": comm.host_all_reduce([float(rank)], group),
    }


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_router_rows_gather_and_reduce_scatter_their_gradient(backend):
    world = 2
    results = run_on_ranks(world, _worker, backend)
    upstream_sum_ND = sum(torch.arange(world * 6, dtype=torch.float32).view(world * 2, 3) * (r + 1)
                          for r in range(world))
    row_bytes = 3 * 4
    for rank, r in enumerate(results):
        assert r["backend"] == backend
        expected = torch.cat([torch.arange(6, dtype=torch.float32).view(2, 3) + 10 * q for q in range(world)])
        assert torch.equal(r["gathered"], expected)
        assert torch.equal(r["grad"], upstream_sum_ND[2 * rank: 2 * rank + 2])  # every rank's gradient, summed
        if comm.can_reduce_scatter(torch.device("cpu")):
            # A reduce-scatter sends (w-1)/w of the tensor; the all-reduce fallback twice that.
            assert r["traffic"]["router_grad_reduce"] == world * 2 * row_bytes * (world - 1) // world
        assert r["host_device"] == "cpu"  # host values travel over gloo, never the device
        assert r["tokens"] == [[5, 0], [6, 1]] and r["mean"] == [1.0]


def test_gloo_in_this_torch_has_reduce_scatter():
    """torch 2.13 (this machine): the reduce-scatter branch is the one the CPU tests run."""
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert comm.can_reduce_scatter(torch.device("cpu")) == (version >= (2, 13))
    assert comm.can_reduce_scatter(torch.device("cuda"))

"""Which expert computation runs where (moe/experts.py ``expert_kernel``), and that the per-expert
loop takes its split sizes from the layer's one host read instead of making its own.

CUDA cannot exist here: the capability of a GPU is the one thing monkeypatched (``torch.cuda.
get_device_capability``), and the choice is a pure function of (device, dtype, capability). On
CUDA, ``grouped_mm`` outside its bf16 sm90/sm100 fast path runs ``_grouped_mm_fallback``, which
copies the offsets to the host and loops: 6 host copies per layer forward and backward that no
Python-level counter sees. The loop, fed the sizes the dispatch already read, makes none.
"""
from __future__ import annotations

import pytest
import torch

from gatepro_dist.moe.experts import GroupedExperts, describe_expert_kernel, expert_kernel
from host_syncs import count_host_syncs

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("capability,dtype,kernel", [
    ((9, 0), torch.bfloat16, "grouped_mm"),   # H100/H200
    ((10, 0), torch.bfloat16, "grouped_mm"),  # B200
    ((9, 0), torch.float32, "loop"),          # fp32 on any GPU: the fallback
    ((8, 0), torch.bfloat16, "loop"),         # A100
    ((8, 9), torch.bfloat16, "loop"),         # L40S
    ((12, 0), torch.bfloat16, "loop"),        # sm120
])
def test_cuda_runs_grouped_mm_only_on_its_fast_path(monkeypatch, capability, dtype, kernel):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert expert_kernel(CUDA, dtype) == kernel
    assert expert_kernel(CUDA, dtype, grouped_gemm=False) == "loop"
    line = describe_expert_kernel(CUDA, dtype)
    assert ("grouped GEMM" in line) == (kernel == "grouped_mm")
    assert line.startswith("experts: ")


def test_the_cpu_runs_grouped_mm_in_every_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        assert expert_kernel(torch.device("cpu"), dtype) == "grouped_mm"


def test_the_loop_uses_the_split_sizes_it_is_given_and_reads_none():
    experts = GroupedExperts(3, 8, 4, grouped_gemm=False)
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 8)
    with count_host_syncs() as given:
        out_given = experts(x, counts, [2, 0, 3])
    with count_host_syncs() as read:
        out_read = experts(x, counts)
    assert sum(given.values()) == 0
    assert sum(read.values()) == 1  # without them the loop must read the counts itself
    assert torch.equal(out_given, out_read)


def test_the_dispatch_hands_the_experts_their_rows_from_its_one_read():
    from gatepro_dist.moe.dispatch import plan_dispatch

    experts_TK = torch.tensor([[0, 2], [2, 1], [2, 0]])
    plan = plan_dispatch(experts_TK, torch.ones(3, 2), 3, capacity_factor=4.0)  # capacity: the read happens
    assert plan.rows_per_local_expert == [2, 1, 3] == plan.tokens_per_local_expert.tolist()
    dropless = plan_dispatch(experts_TK, torch.ones(3, 2), 3)  # ep=1 dropless: nothing read
    assert dropless.rows_per_local_expert is None

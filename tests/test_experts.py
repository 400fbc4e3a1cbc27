"""Grouped GEMM equals the per-expert loop; a 1-expert top-1 MoE is a dense SwiGLU MLP."""
from __future__ import annotations

import pytest
import torch

from gatepro_dist.moe.experts import GroupedExperts, SwiGLU
from gatepro_dist.moe import MoELayer, MoESpec


@pytest.mark.parametrize("counts", [[5, 0, 7, 1], [0, 0, 0, 9], [3, 3, 3, 3]])
def test_grouped_gemm_equals_loop_forward_and_backward(counts):
    grouped = GroupedExperts(4, 16, 24, grouped_gemm=True)
    loop = GroupedExperts(4, 16, 24, grouped_gemm=False)
    loop.load_state_dict(grouped.state_dict())
    tokens = torch.tensor(counts)
    x = torch.randn(int(tokens.sum()), 16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = grouped(xa, tokens), loop(xb, tokens)
    ya.sum().backward()  # .sum() gives a non-contiguous gradient: grouped_mm must cope
    yb.sum().backward()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for pa, pb in zip(grouped.parameters(), loop.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_moe_equals_dense_swiglu():
    layer = MoELayer(MoESpec(hidden_size=16, num_experts=1, top_k=1, expert_ffn_dim=32, gatepro=False))
    dense = SwiGLU(16, 32)
    with torch.no_grad():
        gate, up = layer.experts.gate_up_proj[0].chunk(2, dim=1)
        dense.gate_proj.weight.copy_(gate.t())
        dense.up_proj.weight.copy_(up.t())
        dense.down_proj.weight.copy_(layer.experts.down_proj[0].t())
    x = torch.randn(2, 10, 16)
    out, stats = layer(x)
    torch.testing.assert_close(out, dense(x), rtol=1e-5, atol=1e-6)
    assert stats.tokens_per_expert.tolist() == [20]


def test_expert_init_is_independent_of_sharding():
    full = GroupedExperts(8, 4, 6)
    second_half = GroupedExperts(4, 4, 6, first_expert=4)
    assert torch.equal(full.gate_up_proj[4:], second_half.gate_up_proj)
    assert torch.equal(full.down_proj[4:], second_half.down_proj)

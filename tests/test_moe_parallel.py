"""The expert-parallel layer equals one process holding every expert, on the same global batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import run_on_ranks
from gatepro_dist.moe.layer import MoELayer, MoESpec, expert_parallel_shard
from gatepro_dist.moe.routing import gatepro_penalty, select_top_k

TOKENS_PER_RANK, HIDDEN = 24, 16
CASES = {
    "gatepro-dropless": dict(gatepro=True),
    "plain-dropless": dict(gatepro=False),
    "gatepro-capacity-position": dict(gatepro=True, capacity_factor=1.0, drop_policy="position"),
    "plain-capacity-probs": dict(gatepro=False, capacity_factor=1.0, drop_policy="probs"),
    "gatepro-capacity-probs": dict(gatepro=True, capacity_factor=0.75, drop_policy="probs"),
}


def make_spec(**overrides) -> MoESpec:
    # A large penalty makes GatePro change many selections, so the test sees its effect.
    base = dict(hidden_size=HIDDEN, num_experts=8, top_k=2, expert_ffn_dim=12,
                num_shared_experts=1, penalty=0.05)
    return MoESpec(**{**base, **overrides})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def global_batch(world: int):
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(world * TOKENS_PER_RANK, HIDDEN, generator=gen)
    upstream = torch.randn(world * TOKENS_PER_RANK, HIDDEN, generator=gen)
    return x, upstream


def reference_layer(spec: MoESpec) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(spec)
    layer.reset_expert_parameters(seed=7)
    return layer


def _ep_worker(rank: int, world: int, case_names: list[str]) -> dict:
    ep_group = dist.new_group(list(range(world)))
    errors = {}
    for name in case_names:
        spec = make_spec(**CASES[name], check_pairs=True)
        ref = reference_layer(spec)
        layer = MoELayer(spec, ep_group)
        layer.load_state_dict(expert_parallel_shard(ref.state_dict(), layer, rank, world))

        x, upstream = global_batch(world)
        mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        x_ref = x.clone().requires_grad_()
        out_ref, stats_ref = ref(x_ref)
        # Every rank's objective adds its own loss share; their sum is world * the global loss.
        ((out_ref * upstream).sum() + world * stats_ref.loss).backward()

        x_mine = x[mine].clone().requires_grad_()
        out, stats = layer(x_mine)
        ((out * upstream[mine]).sum() + stats.loss).backward()

        aux = stats.aux_loss.detach().clone()
        dist.all_reduce(aux)
        z = stats.z_loss.detach().clone()
        dist.all_reduce(z)
        ref_params = dict(ref.named_parameters())
        err = {
            "output": rel_err(out, out_ref[mine]),
            "input_grad": rel_err(x_mine.grad, x_ref.grad[mine]),
            "aux_loss": rel_err(aux / world, stats_ref.aux_loss),
            "z_loss": rel_err(z / world, stats_ref.z_loss),
        }
        for pname, p in layer.named_parameters():
            grad = p.grad.clone()
            expected = ref_params[pname].grad
            if getattr(p, "expert_parallel", False):
                rows = expected.shape[0] // world
                expected = expected[rank * rows : (rank + 1) * rows]
            else:  # replicated parameters see only local tokens: their gradients add up
                dist.all_reduce(grad)
            err[f"grad:{pname}"] = rel_err(grad, expected)
        err["same_counts"] = bool(torch.equal(stats.tokens_per_expert, stats_ref.tokens_per_expert))
        err["same_drops"] = bool(stats.dropped_tokens == stats_ref.dropped_tokens)
        err["same_gatepro_counts"] = bool(stats.gatepro_penalised == stats_ref.gatepro_penalised) and bool(
            stats.gatepro_topk_changed == stats_ref.gatepro_topk_changed)
        err["stats"] = (int(stats.dropped_tokens), int(stats.gatepro_penalised), int(stats.gatepro_topk_changed))
        errors[name] = err
    return errors


@pytest.mark.parametrize("ep", [2, 4])
def test_ep_matches_single_process(ep):
    per_rank = run_on_ranks(ep, _ep_worker, list(CASES))
    for rank, errors in enumerate(per_rank):
        for case, err in errors.items():
            for key, value in err.items():
                if key == "stats":
                    continue
                if isinstance(value, bool):
                    assert value, f"ep={ep} rank={rank} {case}: {key}"
                else:
                    assert value <= 1e-5, f"ep={ep} rank={rank} {case}: {key} rel err {value:.2e}"
    dropped, penalised, changed = per_rank[0]["gatepro-capacity-position"]["stats"]
    assert dropped > 0 and penalised > 0 and changed > 0, "the cases must exercise drops and GatePro"


def naive_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """The layer written as loops straight from the definitions (one process, all experts)."""
    spec = layer.spec
    w_ND = layer.router.weight
    logits = x_TD @ w_ND.t()
    scores = gatepro_penalty(logits, w_ND, spec.penalty) if spec.gatepro else logits
    chosen = select_top_k(scores, spec.top_k)
    keep = torch.ones_like(chosen.experts_TK, dtype=torch.bool)
    if spec.capacity_factor is not None:
        capacity = math.ceil(spec.capacity_factor * x_TD.shape[0] * spec.top_k / spec.num_experts)
        for e in range(spec.num_experts):
            slots = [(t, s) for t in range(x_TD.shape[0]) for s in range(spec.top_k)
                     if chosen.experts_TK[t, s] == e]
            if spec.drop_policy == "probs":
                slots.sort(key=lambda ts: (-float(chosen.weights_TK[ts]), ts[0]))
            for t, s in slots[capacity:]:
                keep[t, s] = False
    out = torch.zeros_like(x_TD)
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    for t in range(x_TD.shape[0]):
        for s in range(spec.top_k):
            if keep[t, s]:
                e = int(chosen.experts_TK[t, s])
                g, u = (x_TD[t] @ gate_up[e]).chunk(2)
                out[t] += chosen.weights_TK[t, s] * ((F.silu(g) * u) @ down[e])
    return out + layer.shared_experts(x_TD)


@pytest.mark.parametrize("case", list(CASES))
def test_ep1_layer_matches_naive_loops(case):
    layer = reference_layer(make_spec(**CASES[case]))
    x, _ = global_batch(2)
    with torch.no_grad():
        out, _ = layer(x)
        expected = naive_moe(layer, x)
    assert rel_err(out, expected) <= 1e-5


def _imbalance_worker(rank, world, capacity_factor):
    ep_group = dist.new_group(list(range(world)))
    spec = make_spec(num_shared_experts=0, capacity_factor=capacity_factor)
    layer = MoELayer(spec, ep_group)
    with torch.no_grad():  # expert 0 wins every token; the rest tie and lose to expert 1
        layer.router.weight.fill_(-1.0)
        if rank == 0:
            layer.router.weight[0].fill_(1.0)
    x = torch.rand(TOKENS_PER_RANK, HIDDEN, requires_grad=True)
    out, stats = layer(x)
    (out.square().sum() + stats.loss).backward()
    grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters())
    return dict(finite=bool(torch.isfinite(out).all()) and grads_finite,
                zero=int(stats.zero_token_experts), dropped=int(stats.dropped_tokens),
                counts=stats.tokens_per_expert.tolist())


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_extreme_imbalance_runs_without_hang_or_nan(capacity_factor):
    world = 2
    for result in run_on_ranks(world, _imbalance_worker, capacity_factor):
        assert result["finite"]
        assert result["zero"] == 6  # of 8 experts, only 0 and 1 receive tokens
        assert result["counts"][:2] == [world * TOKENS_PER_RANK] * 2
        if capacity_factor is None:
            assert result["dropped"] == 0
        else:  # capacity = ceil(48 * 2 / 8) = 12 per expert; 2 * 48 routed
            assert result["dropped"] == 2 * (world * TOKENS_PER_RANK - 12)

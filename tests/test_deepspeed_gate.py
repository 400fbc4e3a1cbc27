"""GateProGate inside deepspeed.moe: our router's decisions, DeepSpeed's gate at penalty 0, EP=2 training."""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from gatepro_dist.integrations.deepspeed_gate import (SPARSE_ROUTES_CONTRACT, GateProGate, deepspeed_balance_loss,
                                                      use_gatepro)
from gatepro_dist.moe.router import GateProRouter

D, N, T = 16, 8, 96


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=gen)


def _deepspeed_gate(k, drop_tokens, min_capacity=4):
    from deepspeed.moe.sharded_moe import TopKGate

    # DeepSpeed's own gate with its random features off: no RTS, no Gumbel 2nd expert, no noise.
    return TopKGate(D, N, k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=min_capacity,
                    noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False, ep_group=None,
                    top2_2nd_expert_sampling=False)


# Return forms the installed DeepSpeed's MOELayer can ask for: sparse routes exist from 0.19.4 on.
RETURN_FORMS = [True, False] if SPARSE_ROUTES_CONTRACT else [False]


def _call(gate, x, sparse_routes):
    return gate(x, None, True) if sparse_routes else gate(x, None)


def _selection(gate, x, sparse_routes):
    """(expert ids [T, K], weights [T, K]) in descending weight order, from either return form."""
    return _selection_of(_call(gate, x, sparse_routes), gate.k, sparse_routes)


def _selection_of(out, k, sparse_routes):
    if sparse_routes:
        _, _, _, experts_KT, _, weights_KT, _ = out
        return experts_KT.long().t(), weights_KT.t()
    _, combine_TEC, _, _ = out
    weights_TK, experts_TK = combine_TEC.sum(dim=2).topk(k, dim=1)
    return experts_TK, weights_TK


def test_installed_deepspeed_speaks_the_sparse_routes_contract():
    import deepspeed

    assert deepspeed.__version__.startswith("0.19.")
    assert SPARSE_ROUTES_CONTRACT == (tuple(int(x) for x in deepspeed.__version__.split(".")[:3]) >= (0, 19, 4))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sparse_routes", RETURN_FORMS)
def test_gate_makes_our_routers_selections_and_weights(k, sparse_routes):
    """Same weights, same tokens, dropless: identical expert ids and mixture weights.

    DeepSpeed's top-1 weight is the chosen expert's full-softmax probability (our
    normalize_topk=False); for k >= 2 it renormalises over the chosen k (normalize_topk=True).
    """
    penalty = 0.1  # large enough that GatePro changes many top-k sets of these logits (std ~0.6)
    gate = GateProGate(D, N, k, drop_tokens=False, penalty=penalty)
    router = GateProRouter(D, N, k, penalty=penalty, normalize_topk=k > 1)
    with torch.no_grad():
        gate.wg.weight.copy_(torch.randn(N, D, generator=torch.Generator().manual_seed(k)) * 0.15)
        router.weight.copy_(gate.wg.weight)
    x = _inputs()
    experts_TK, weights_TK = _selection(gate, x, sparse_routes)
    ours = router(x)
    assert torch.equal(experts_TK, ours.experts_TK)
    torch.testing.assert_close(weights_TK, ours.weights_TK, rtol=1e-6, atol=1e-7)
    counts_N = _call(gate, x, sparse_routes)[-1]
    assert torch.equal(counts_N, torch.bincount(ours.experts_TK.flatten(), minlength=N))
    if k > 1:  # GatePro never penalises a token's top-1 expert, so with k=1 the choice cannot change
        assert ours.gatepro_topk_changed > 0


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("sparse_routes", RETURN_FORMS)
def test_penalty_zero_is_exactly_deepspeeds_gate(k, drop_tokens, sparse_routes):
    """Both return contracts: the 7-tuple of sparse routes (>= 0.19.4) and the dense 4-tuple."""
    reference = _deepspeed_gate(k, drop_tokens)
    gate = GateProGate.replacing(reference, penalty=0.0)
    x = _inputs(1)
    expected, got = _call(reference, x, sparse_routes), _call(gate, x, sparse_routes)
    assert len(got) == len(expected) == (7 if sparse_routes else 4)
    for a, b in zip(expected, got):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    gate.penalty, gate.gatepro_enabled = 1e-2, False  # switched off: plain routing again
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b))
               for a, b in zip(expected, _call(gate, x, sparse_routes)))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_balance_loss_is_deepspeeds_formula_on_raw_probabilities(k):
    reference = _deepspeed_gate(k, drop_tokens=False)
    x = _inputs(2)
    logits = x @ reference.wg.weight.detach().t()
    torch.testing.assert_close(deepspeed_balance_loss(logits, logits, k), reference(x)[0])
    gate = GateProGate.replacing(reference, penalty=0.05)
    penalised = gate.penalised_logits(logits)
    torch.testing.assert_close(gate(x)[0], deepspeed_balance_loss(logits, penalised, k))


def test_use_gatepro_swaps_the_gate_and_keeps_wg():
    from deepspeed.moe.layer import MoE

    moe = MoE(hidden_size=D, expert=torch.nn.Linear(D, D), num_experts=N, ep_size=1, k=2)
    wg = moe.deepspeed_moe.gate.wg
    names_before = [n for n, _ in moe.named_parameters()]
    gate = use_gatepro(moe, penalty=1e-3)
    assert isinstance(gate, GateProGate) and moe.deepspeed_moe.gate is gate
    assert gate.wg is wg and [n for n, _ in moe.named_parameters()] == names_before
    assert (gate.use_rts, gate.top2_2nd_expert_sampling, gate.noisy_gate_policy, gate.k) == (False, False, None, 2)
    assert use_gatepro(moe, penalty=2e-3) is gate and gate.penalty == 2e-3
    with pytest.raises(TypeError, match="deepspeed.moe.layer.MoE"):
        use_gatepro(torch.nn.Linear(2, 2))


def _train_ep2(rank, world, steps):
    import os

    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed
    from deepspeed.moe.layer import MoE

    from gatepro_dist.moe.routing import most_similar_expert

    torch.manual_seed(0)  # the same initial weights on both ranks (DeepSpeed broadcasts them anyway)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Linear(D, D)
            self.moe = MoE(hidden_size=D, expert=torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.GELU(),
                                                                     torch.nn.Linear(32, D)),
                           num_experts=4, ep_size=2, k=2, drop_tokens=False)
            self.out = torch.nn.Linear(D, 1)

        def forward(self, x):
            h, l_aux, _ = self.moe(torch.relu(self.inp(x)))
            return self.out(h).squeeze(-1), l_aux

    net = Net()
    gate = use_gatepro(net.moe, penalty=1e-2)
    seen = []  # per forward: the tokens the gate saw, the wg it used, and its (experts, weights)

    def record(module, inputs, out):
        if module.training:
            sparse = len(out) == 7
            seen.append((inputs[0].detach().clone(), module.wg.weight.detach().clone(),
                         *_selection_of(out, module.k, sparse)))

    gate.register_forward_hook(record)
    config = {"train_micro_batch_size_per_gpu": 64, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=config)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(64, D, generator=gen)
    y = x[:, 0] * x[:, 1] + x[:, 2]
    losses = []
    for _ in range(steps):
        pred, l_aux = engine(x)
        loss = torch.nn.functional.mse_loss(pred, y) + 0.01 * l_aux
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return {"losses": losses, "gate": type(engine.module.moe.deepspeed_moe.gate).__name__,
            "ep_group_size": torch.distributed.get_world_size(gate.ep_group),
            "rivals": most_similar_expert(gate.wg.weight).tolist(), "wg": gate.wg.weight.detach().clone(),
            "seen": seen}


def test_ep2_deepspeed_moe_trains_with_the_gatepro_gate():
    results = run_on_ranks(2, _train_ep2, 8)
    for r in results:
        assert r["gate"] == "GateProGate" and r["ep_group_size"] == 2
        assert r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]
    # wg is replicated and reduced over the world: every EP rank makes the same GatePro pairs.
    assert torch.equal(results[0]["wg"], results[1]["wg"]) and results[0]["rivals"] == results[1]["rivals"]
    # At every step, on every rank, the gate inside the EP=2 engine picked the experts our router
    # picks for the same tokens with the same weights, and mixed them with the same weights.
    changed = 0
    for r in results:
        assert len(r["seen"]) == 8
        for x_TD, wg_ND, experts_TK, weights_TK in r["seen"]:
            router = GateProRouter(D, 4, 2, penalty=1e-2, normalize_topk=True)
            with torch.no_grad():
                router.weight.copy_(wg_ND)
                ours = router(x_TD)
            assert torch.equal(experts_TK, ours.experts_TK)
            torch.testing.assert_close(weights_TK, ours.weights_TK, rtol=1e-6, atol=1e-7)
            changed += int(ours.gatepro_topk_changed)
    assert changed > 0  # the penalty changed some top-2 sets: GatePro decided, not plain top-k

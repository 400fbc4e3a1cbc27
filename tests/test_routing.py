"""GatePro's pure functions against the paper's definition, written as plain loops."""
from __future__ import annotations

import math

import pytest
import torch

from gatepro_dist.moe.router import GateProRouter
from gatepro_dist.moe.routing import (
    gate_similarity_stats,
    gatepro_delta,
    gatepro_penalty,
    load_balancing_loss,
    most_similar_expert,
    select_top_k,
)


def paper_rival(w: torch.Tensor) -> list[int]:
    n = w.shape[0]
    rival = []
    for i in range(n):
        best, best_j = -math.inf, None
        for j in range(n):
            if j == i:
                continue
            cos = float(w[i].double() @ w[j].double() / (w[i].double().norm() * w[j].double().norm()))
            if cos > best + 1e-9:  # strictly better: ties (to 1e-9) keep the lowest index
                best, best_j = cos, j
        rival.append(best_j)
    return rival


def paper_penalty(logits: torch.Tensor, w: torch.Tensor, lam: float) -> torch.Tensor:
    rival = paper_rival(w)
    out = logits.clone().double()
    for t in range(logits.shape[0]):
        for i in range(logits.shape[1]):
            if logits[t, i] < logits[t, rival[i]]:
                out[t, i] -= lam
    return out


def tricky_inputs(seed: int, tokens=64, experts=12, hidden=8):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(experts, hidden, generator=gen)
    w[5] = w[2] * 3.0  # identical direction: exact cosine tie for expert 2's rival search
    w[7] = w[2] * 0.5
    logits = torch.randn(tokens, experts, generator=gen)
    logits[:8, 2] = logits[:8, 5]  # exact logit ties inside a pair
    logits[8:16, 5] = logits[8:16, 2] + 3e-5  # near ties, |dl| < lambda
    return logits, w


@pytest.mark.parametrize("seed", range(5))
def test_gatepro_equals_paper_loop(seed):
    logits, w = tricky_inputs(seed)
    assert most_similar_expert(w).tolist() == paper_rival(w)
    got = gatepro_penalty(logits, w, 1e-4)
    assert torch.equal(got.double(), paper_penalty(logits.float(), w, 1e-4).float().double())


def test_exact_direction_tie_goes_to_lowest_index():
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    assert most_similar_expert(w).tolist() == [1, 0, 0, 0]


def test_gatepro_never_penalises_the_winner_and_at_most_once():
    logits, w = tricky_inputs(11)
    lam = 1e-4
    rival = most_similar_expert(w)
    delta = gatepro_delta(logits, rival, lam)
    assert set(delta.unique().tolist()) <= {0.0, float(torch.tensor(-lam))}, "an expert was penalised more than once"
    torch.testing.assert_close(gatepro_penalty(logits, w, lam), logits + delta, rtol=0, atol=0)
    winners = logits >= logits[:, rival]  # not strictly below its rival: must be untouched
    assert bool((delta[winners] == 0).all())
    # the strict argmax of every token is never penalised
    assert bool((delta.gather(1, logits.argmax(1, keepdim=True)) == 0).all())


def test_penalty_zero_is_plain_top_k():
    """Penalty 0 with GatePro on equals a plain top-k + softmax over k written here, not the router's
    own GatePro-off branch; and on these tokens a real penalty would change the choice."""
    logits, w = tricky_inputs(3)
    assert torch.equal(gatepro_penalty(logits, w, 0.0), logits)
    router = GateProRouter(8, 12, 3, gatepro_enabled=True, penalty=0.0)
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    logits_TN = x @ router.weight.t()
    top = logits_TN.topk(3, dim=1)
    got = router(x)
    assert torch.equal(got.experts_TK, top.indices)
    torch.testing.assert_close(got.weights_TK, torch.softmax(top.values, dim=1), rtol=1e-6, atol=0)
    router.penalty = 0.05
    assert not torch.equal(router(x).experts_TK, top.indices)  # so the equality above says something


def test_router_without_gatepro_is_top_k_then_softmax_over_k():
    router = GateProRouter(8, 6, 2, gatepro_enabled=False)
    x = torch.randn(30, 8)
    r = router(x)
    logits = x @ router.weight.t()
    top = logits.topk(2, dim=1)
    assert torch.equal(r.experts_TK, top.indices)
    assert torch.allclose(r.weights_TK, torch.softmax(top.values, dim=1), rtol=1e-6)
    assert (r.experts_TK.unsqueeze(2) == r.experts_TK.unsqueeze(1)).sum((1, 2)).eq(2).all()


def test_gatepro_changes_top_k_when_the_pair_loser_leads_by_less_than_lambda():
    # 0 <-> 1 are each other's rivals, as are 2 <-> 3.
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, -0.1, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0], [0.0, 0.1, 1.0, 1.0]])
    logits = torch.tensor([[1.0, 0.99996, 0.99992, -1.0]])
    assert most_similar_expert(w).tolist() == [1, 0, 3, 2]
    plain = select_top_k(logits, 2).experts_TK
    chosen = select_top_k(gatepro_penalty(logits, w, 1e-4), 2).experts_TK
    assert plain.tolist() == [[0, 1]]
    assert chosen.tolist() == [[0, 2]]  # expert 1 lost its pair and fell below expert 2
    router = GateProRouter(4, 4, 2, penalty=1e-4)
    with torch.no_grad():
        router.weight.copy_(w)
    token = torch.linalg.solve(w.double(), logits.t().double()).t().float()  # token @ w.T == logits
    routed = router(token)
    assert routed.experts_TK.tolist() == [[0, 2]] and routed.gatepro_topk_changed == 1
    assert routed.gatepro_penalised == 2  # experts 1 and 3


def test_bf16_autocast_does_not_swallow_the_penalty():
    """Under bf16 autocast (train.dtype=bf16) with bf16 tokens, the router's fp32 guard keeps the
    logits fp32: without it autocast would run the matmul in bf16, where l - 1e-4 == l."""
    router = GateProRouter(16, 8, 2, gatepro_enabled=True, penalty=1e-4)
    x = (torch.randn(64, 16) * 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x.float() @ router.weight.float().t()).dtype == torch.bfloat16  # what the guard prevents
        r = router(x)
    assert r.logits_TN.dtype == torch.float32 and r.weights_TK.dtype == torch.float32
    logits = x.float() @ router.weight.t()
    assert torch.equal(r.logits_TN, logits)  # computed in fp32, not rounded through bf16
    assert r.gatepro_penalised > 0
    penalised = gatepro_penalty(logits, router.weight, 1e-4)
    assert bool(((penalised - logits) != 0).any()), "the penalty vanished"
    assert r.experts_TK.tolist() == select_top_k(penalised, 2).experts_TK.tolist()
    # the same subtraction in bf16 would be lost for most entries:
    lost = (logits.bfloat16() - 1e-4) == logits.bfloat16()
    assert bool(lost.float().mean() > 0.5)


def test_gradient_passes_through_the_penalty_unchanged():
    logits, w = tricky_inputs(2)
    a = logits.clone().requires_grad_()
    gatepro_penalty(a, w, 1e-4).mul(torch.arange(12.0)).sum().backward()
    assert torch.equal(a.grad, torch.arange(12.0).expand_as(logits))


def test_balance_loss_is_one_when_perfectly_uniform():
    logits = torch.zeros(16, 4)
    counts = torch.full((4,), 8)
    assert load_balancing_loss(logits, counts, 16, 2).item() == pytest.approx(1.0)


def test_balance_loss_of_an_uneven_batch_by_hand():
    """N = 4 experts, top-2, this rank's 2 tokens out of 4 in the EP group, an unused expert.

    Probabilities: the logits are logs, so softmax is the numbers over their sum (8):
        token 0: ln[1, 2, 4, 1] -> p = [1, 2, 4, 1] / 8
        token 1: ln[4, 1, 2, 1] -> p = [4, 1, 2, 1] / 8
        P (mean over this rank's tokens) = [5, 3, 6, 2] / 16
    Fractions over the EP group's 4 * 2 = 8 assignments, counts [3, 0, 4, 1]:
        f = [3, 0, 4, 1] / 8
    Loss = N * sum_i f_i P_i = 4 * (3*5 + 0*3 + 4*6 + 1*2) / (8*16) = 4 * 41/128 = 41/32.
    Gradient (f is a constant): dL/dlogit[t, j] = N/T * p_tj * (f_j - sum_i f_i p_ti), N/T = 2:
        token 0: sum_i f_i p_0i = (3*1 + 0*2 + 4*4 + 1*1) / 64 = 20/64; f - 20/64 = [4, -20, 12, -12] / 64
                 -> 2 * [1, 2, 4, 1]/8 * [4, -20, 12, -12]/64 = [8, -80, 96, -24] / 512
        token 1: sum_i f_i p_1i = (3*4 + 0*1 + 4*2 + 1*1) / 64 = 21/64; f - 21/64 = [3, -21, 11, -13] / 64
                 -> 2 * [4, 1, 2, 1]/8 * [3, -21, 11, -13]/64 = [24, -42, 44, -26] / 512
    """
    logits = torch.tensor([[1.0, 2.0, 4.0, 1.0], [4.0, 1.0, 2.0, 1.0]]).log().requires_grad_()
    counts = torch.tensor([3, 0, 4, 1])
    loss = load_balancing_loss(logits, counts, 4, 2)
    assert loss.item() == pytest.approx(41 / 32, rel=1e-6)
    loss.backward()
    expected_grad = torch.tensor([[8.0, -80.0, 96.0, -24.0], [24.0, -42.0, 44.0, -26.0]]) / 512
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-5, atol=1e-7)


def test_similarity_stats_of_orthogonal_rows():
    stats = gate_similarity_stats(torch.eye(4))
    assert stats["mean_cos"] == pytest.approx(0.0)
    assert stats["mean_angle_deg"] == pytest.approx(90.0)
    assert stats["spectral_entropy"] == pytest.approx(math.log(4))
    assert stats["mean_nearest_cos"] == pytest.approx(0.0)


def test_nearest_cosine_is_the_similarity_of_the_pairs_gatepro_forms():
    weight_ND = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    rival_N = most_similar_expert(weight_ND)
    unit_ND = weight_ND / weight_ND.norm(dim=1, keepdim=True)
    pair_cos_N = (unit_ND * unit_ND[rival_N]).sum(dim=1)
    assert gate_similarity_stats(weight_ND)["mean_nearest_cos"] == pytest.approx(float(pair_cos_N.mean()), abs=1e-6)
    assert gate_similarity_stats(weight_ND)["mean_nearest_cos"] > gate_similarity_stats(weight_ND)["mean_cos"]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: gatepro_penalty(torch.zeros(4, 3, 2), torch.randn(3, 4)), "logits must be 2-D"),
        (lambda: gatepro_penalty(torch.zeros(4, 3), torch.randn(3, 4), -1e-4), "penalty"),
        (lambda: gatepro_penalty(torch.zeros(4, 3), torch.randn(3, 4), float("nan")), "penalty"),
        (lambda: select_top_k(torch.zeros(4, 3), 4), "top_k=4"),
        (lambda: GateProRouter(8, 4, 5), "top_k=5"),
        (lambda: GateProRouter(8, 4, 2, penalty=-1.0), "penalty"),
        (lambda: GateProRouter(8, 4, 2)(torch.zeros(3, 7)), "hidden size 7"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(call, match):
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_top_k_ties_go_to_the_lowest_index_like_a_stable_sort():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(-3, 4, (200, 9), generator=gen).float()  # many exact ties
    bias = torch.randint(-1, 2, (9,), generator=gen).float()
    for k in (1, 2, 4, 9):
        stable = (scores + bias).sort(dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(select_top_k(scores, k, bias).experts_TK, stable)

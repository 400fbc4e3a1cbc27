"""Every reading of GatePro (moe/competition.py) against a loop written from its definition.

The loops work on Python numbers, one token and one expert at a time; fp32 and bf16 arithmetic is
rounded where the definition rounds (``_f32``, ``_bf16``). Inputs are built to have ties: small
integer logits, rows of equal logits, and values that bf16 rounds together.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gatepro_dist.moe.competition import (
    Competition,
    compete,
    partner_co_selected,
    random_derangement,
    round_logits,
    winners_first_top_k,
)
from gatepro_dist.moe.router import GateProRouter
from gatepro_dist.moe.routing import gatepro_delta, most_similar_expert, select_top_k

N, K = 8, 3


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).item()


def _softmax(values: list[float]) -> list[float]:
    return torch.softmax(torch.tensor(values, dtype=torch.float32), dim=0).tolist()


def reference(logits_TN, rival_N, rule: Competition, top_k, bias_N=None, normalize=True):
    """The definition, token by token: (experts best first, weights, number of losers)."""
    rival = rival_N.tolist()
    experts, weights, losers = [], [], 0
    for row in logits_TN.tolist():
        if rule.precision != "fp32":
            row = [_bf16(v) for v in row]
        scores = row if rule.space == "logits" else _softmax(row)
        if rule.space == "probs" and rule.precision == "bf16":
            scores = [_bf16(v) for v in scores]
        n = len(row)
        loses = [scores[i] < scores[rival[i]] for i in range(n)]
        losers += sum(loses)
        bias = [0.0] * n if bias_N is None else bias_N.tolist()
        if rule.mode == "mask":
            key = [_f32(scores[i] + bias[i]) if bias_N is not None else scores[i] for i in range(n)]
            ranked = sorted(range(n), key=lambda i: (loses[i], -key[i], i))
            weight_scores = row
        else:
            lam_bf16 = _bf16(-rule.penalty)
            if rule.precision == "bf16":  # a bf16 sum: the fp32 sum of the bf16 values, rounded to bf16
                penalised = [_bf16(_f32(s + lam_bf16)) if lose else s for s, lose in zip(scores, loses)]
            else:
                penalised = [_f32(s + _f32(-rule.penalty)) if lose else s for s, lose in zip(scores, loses)]
            key = [_f32(penalised[i] + bias[i]) if bias_N is not None else penalised[i] for i in range(n)]
            ranked = sorted(range(n), key=lambda i: (-key[i], i))
            weight_scores = penalised if rule.space == "logits" else row
        chosen = ranked[:top_k]
        experts.append(chosen)
        if normalize:
            weights.append(_softmax([weight_scores[i] for i in chosen]))
        else:
            full = _softmax(weight_scores)
            weights.append([full[i] for i in chosen])
    return experts, weights, losers


def tied_logits(seed: int, tokens: int = 64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randint(-2, 3, (tokens, N), generator=gen).float() * 0.5  # many exact ties
    logits[:4] = 0.0  # rows where every logit ties
    logits[4:12] += torch.randn(8, N, generator=gen) * 1e-3  # near-ties that bf16 rounds together
    logits[12:20] = torch.randn(8, N, generator=gen) * 3  # spread out
    return logits


READINGS = [Competition(mode, "similar", space, penalty, precision)
            for mode, space, precision, penalty in itertools.product(
                ("penalty", "mask"), ("logits", "probs"), ("fp32", "bf16", "bf16_fp32_penalty"), (1e-4, 0.3))]


@pytest.mark.parametrize("rule", READINGS, ids=lambda r: f"{r.mode}-{r.space}-{r.precision}-{r.penalty}")
@pytest.mark.parametrize("normalize", [True, False])
def test_every_reading_selects_and_weighs_as_its_definition(rule, normalize):
    for seed in range(3):
        logits = tied_logits(seed)
        rival = random_derangement(N, seed) if seed else torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])
        decision = compete(round_logits(logits, rule.precision), rival, rule, K, normalize=normalize)
        experts, weights, losers = reference(logits, rival, rule, K, normalize=normalize)
        assert decision.chosen.experts_TK.tolist() == experts
        torch.testing.assert_close(decision.chosen.weights_TK, torch.tensor(weights), rtol=0, atol=1e-6)
        assert int(decision.losers) == losers


@pytest.mark.parametrize("mode", ["penalty", "mask"])
def test_a_selection_bias_steers_selection_in_logit_space(mode):
    rule = Competition(mode, penalty=0.3)
    bias = torch.linspace(-0.5, 0.5, N)
    logits, rival = tied_logits(5), random_derangement(N, 5)
    decision = compete(logits, rival, rule, K, bias)
    experts, weights, _ = reference(logits, rival, rule, K, bias)
    assert decision.chosen.experts_TK.tolist() == experts
    torch.testing.assert_close(decision.chosen.weights_TK, torch.tensor(weights), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="probability space with a selection bias"):
        compete(logits, rival, Competition(mode, space="probs"), K, bias)


def test_the_default_reading_is_the_router_before_readings_existed_bit_for_bit():
    """penalty / similar / logits / fp32 is the equations' router: l + delta, top-k, softmax over k."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    router = GateProRouter(16, N, K, penalty=1e-2, init_std=0.02)
    router.reset_parameters(seed=3)
    routing = router(x)
    weight = router.weight.detach()
    logits = x @ weight.t()
    before = select_top_k(logits + gatepro_delta(logits, most_similar_expert(weight), 1e-2), K)
    assert int(routing.gatepro_topk_changed) > 0  # the penalty acted on these tokens
    assert torch.equal(routing.experts_TK, before.experts_TK)
    assert torch.equal(routing.weights_TK, before.weights_TK)
    assert torch.equal(routing.logits_TN, logits)


def test_the_default_router_backward_is_unchanged():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=gen)
    router = GateProRouter(16, N, K, penalty=1e-2)
    router.reset_parameters(seed=4)
    router(x).weights_TK.square().sum().backward()
    weight = router.weight.detach().clone().requires_grad_(True)
    logits = x @ weight.t()
    select_top_k(logits + gatepro_delta(logits, most_similar_expert(weight), 1e-2), K).weights_TK.square().sum().backward()
    assert torch.equal(router.weight.grad, weight.grad)


def test_bf16_precision_rounds_the_logits_the_losses_see_and_passes_their_gradient():
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    router = GateProRouter(16, N, K, logit_precision="bf16")
    router.reset_parameters(seed=5)
    routing = router(x)
    assert routing.logits_TN.dtype == torch.float32
    assert torch.equal(routing.logits_TN, routing.logits_TN.to(torch.bfloat16).float())
    routing.logits_TN.sum().backward()
    # d(sum of x W^T)/dW = the column sums of x for every row, through the rounding (order of sums aside)
    torch.testing.assert_close(router.weight.grad, x.sum(0).expand(N, -1), rtol=1e-6, atol=1e-6)


def test_an_all_bf16_penalty_of_1e_4_vanishes_where_an_fp32_penalty_breaks_the_tie():
    """The paper's lambda against bf16 logits: l - 1e-4 rounds back to l for |l| >= ~0.05."""
    logits = torch.tensor([[0.5, 0.5, 0.25, 0.0]])  # experts 0 and 1 tie; 1 is 0's rival and the reverse
    rival = torch.tensor([1, 0, 3, 2])
    fp32_penalty = compete(logits, rival, Competition(penalty=1e-4, precision="bf16_fp32_penalty"), 1)
    all_bf16 = compete(logits, rival, Competition(penalty=1e-4, precision="bf16"), 1)
    assert int(fp32_penalty.losers) == 1 and int(all_bf16.losers) == 1  # expert 3 (0.0) loses to 2
    logits[0, 1] = 0.5 - 2 ** -9  # below 0.5 in bf16: expert 1 loses its pair
    fp32 = compete(logits, rival, Competition(penalty=1e-4, precision="bf16_fp32_penalty"), 2)
    bf16 = compete(logits, rival, Competition(penalty=1e-4, precision="bf16"), 2)
    assert fp32.chosen.experts_TK.tolist() == bf16.chosen.experts_TK.tolist() == [[0, 1]]
    # and the bf16 sum leaves the loser's logit where it was: 0.498 - 1e-4 rounds back to 0.498
    assert _bf16(_f32(_bf16(0.5 - 2 ** -9) + _bf16(-1e-4))) == _bf16(0.5 - 2 ** -9)


def test_winners_rank_before_losers_and_losers_fill_the_slots_left():
    key = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    demoted = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    assert winners_first_top_k(key, demoted, 3).tolist() == [[1, 4, 0], [0, 1, 2]]


def test_the_placebo_rivals_are_a_seeded_derangement():
    for n in (2, 3, 8, 128):
        for seed in range(5):
            perm = random_derangement(n, seed)
            assert sorted(perm.tolist()) == list(range(n))
            assert not bool((perm == torch.arange(n)).any())
            assert torch.equal(perm, random_derangement(n, seed))
    assert {tuple(random_derangement(3, s).tolist()) for s in range(40)} == {(1, 2, 0), (2, 0, 1)}
    assert not torch.equal(random_derangement(128, 0), random_derangement(128, 1))
    with pytest.raises(ValueError, match="at least 2 experts"):
        random_derangement(1, 0)


def test_the_router_uses_its_seeded_placebo_rivals():
    router = GateProRouter(16, N, K, pairing="random", mode="mask")
    router.reset_parameters(seed=7)
    assert torch.equal(router.random_rival, random_derangement(N, 7))
    assert "random_rival" not in router.state_dict()  # remade from the seed, never saved
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    routing = router(x)
    logits = x @ router.weight.detach().t()
    expected = compete(logits, random_derangement(N, 7), Competition("mask", "random"), K)
    assert torch.equal(routing.experts_TK, expected.chosen.experts_TK)


def test_partner_co_selection_counts_tokens_holding_an_expert_and_its_partner():
    experts = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 3], [2, 0]])
    partner = torch.tensor([1, 0, 3, 0])  # 0<->1 mutual; 2's partner is 3, 3's is 0
    # by hand: [0, 1] holds 0 and its partner 1; [3, 2] holds 2 and its partner 3; no other row does
    assert int(partner_co_selected(experts, partner)) == 2


@pytest.mark.parametrize("bad", [dict(mode="hard"), dict(pairing="nearest"), dict(space="prob"),
                                 dict(precision="fp16"), dict(penalty=-1.0)])
def test_an_unknown_reading_is_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="pick one of them|penalty must be"):
        Competition(**bad)


def test_the_readings_are_config_keys_checked_before_any_work():
    from gatepro_dist.config import ConfigError, load_config
    from gatepro_dist.config_checks import validate

    cfg = load_config("configs/quickstart.yaml", ["router.gatepro.mode=mask", "router.gatepro.pairing=random",
                                                  "router.gatepro.space=probs", "router.logit_precision=bf16"])
    assert (cfg.router.gatepro.mode, cfg.router.gatepro.pairing, cfg.router.gatepro.space,
            cfg.router.logit_precision) == ("mask", "random", "probs", "bf16")
    with pytest.raises(ConfigError, match="router.gatepro.mode.*penalty.*mask"):
        load_config("configs/quickstart.yaml", ["router.gatepro.mode=hard"])
    with pytest.raises(ConfigError, match="router.logit_precision"):
        load_config("configs/quickstart.yaml", ["router.logit_precision=fp16"])
    with pytest.raises(ConfigError, match="space.*router.bias.enabled=false"):
        validate(load_config("configs/quickstart.yaml", ["router.gatepro.space=probs", "router.bias.enabled=true"]), 2)


def test_a_layer_of_one_expert_has_no_partner_to_co_select():
    assert int(partner_co_selected(torch.zeros(5, 1, dtype=torch.long), None)) == 0

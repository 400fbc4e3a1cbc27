"""Dispatch conserves assignments: on a real gloo group, with uneven token counts per rank, a rank
with no tokens and an expert that nobody picks, every (token, slot) reaches the rank that owns its
expert exactly once, is computed by that expert, and comes back exactly once to its own token."""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from distributed import run_on_ranks
from gatepro_dist.moe.dispatch import combine, dispatch, plan_dispatch

NUM_EXPERTS, TOP_K = 8, 2
# Tokens of each EP rank, per layout. "both_ranks_send": every rank sends rows to every rank, so a
# receiver holds several (source rank, local expert) blocks and must regroup them by local expert
# (a missing transpose in that regrouping hands rows to the wrong experts). "empty_rank": rank 1
# has no tokens, so every received row comes from rank 0 and the regrouping is the identity.
LAYOUTS = {
    "ep2_both_ranks_send": (2, [9, 5]),
    "ep2_empty_rank": (2, [9, 0]),
    "ep4_uneven": (4, [6, 0, 11, 1]),
}
UNUSED_EXPERT = NUM_EXPERTS - 1  # never chosen: its rank receives nothing for it


def routing(rank: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (none is UNUSED_EXPERT) and distinct powers-of-two weights."""
    gen = torch.Generator().manual_seed(100 + rank)
    experts_TK = torch.stack([torch.randperm(NUM_EXPERTS - 1, generator=gen)[:TOP_K] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, TOP_K, dtype=torch.long)
    weights_TK = torch.tensor([[2.0 ** -(slot + 1) for slot in range(TOP_K)]] * num_tokens).reshape(-1, TOP_K)
    return experts_TK, weights_TK


def _round_trip(rank: int, world: int, group, num_tokens: int) -> dict:
    experts_TK, weights_TK = routing(rank, num_tokens)
    # A token's row names it: (source rank, token index); D = 2 + one column per expert.
    x_TD = torch.zeros(num_tokens, 2 + NUM_EXPERTS)
    x_TD[:, 0], x_TD[:, 1] = float(rank), torch.arange(num_tokens, dtype=torch.float32)

    plan = plan_dispatch(experts_TK, weights_TK, NUM_EXPERTS, group)
    rows = dispatch(x_TD, plan, group)
    num_local = NUM_EXPERTS // world
    local_expert_M = torch.repeat_interleave(torch.arange(num_local), plan.tokens_per_local_expert)
    expert_M = rank * num_local + local_expert_M
    received = sorted((int(r[0]), int(r[1]), int(e)) for r, e in zip(rows, expert_M))

    # The "expert" marks its own column with 1: the combined row of a token then holds, per expert,
    # the weight of the slot that chose it, and (rank, token) times the sum of its weights.
    y = rows.clone()
    y[torch.arange(y.shape[0]), 2 + expert_M] = 1.0
    out_TD = combine(y, plan, weights_TK, num_tokens, group)
    return dict(received=received, out=out_TD, tokens_per_expert=plan.tokens_per_expert,
                total_tokens=plan.total_tokens, tokens_per_local_expert=plan.tokens_per_local_expert)


def _worker(rank: int, world: int, layout_names: list[str]) -> dict:
    """Every layout of this world size on one group: one spawn per world size, not per layout."""
    group = dist.new_group(list(range(world)))
    return {name: _round_trip(rank, world, group, LAYOUTS[name][1][rank]) for name in layout_names}


@functools.cache
def _results(ep: int) -> list[dict]:
    return run_on_ranks(ep, _worker, [name for name, (world, _) in LAYOUTS.items() if world == ep])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_token_slot_is_sent_once_and_returned_once(layout):
    ep, tokens_per_rank = LAYOUTS[layout]
    results = [r[layout] for r in _results(ep)]
    sent = sorted((rank, t, int(e)) for rank, n in enumerate(tokens_per_rank)
                  for t, row in enumerate(routing(rank, n)[0]) for e in row)
    received = sorted(triple for r in results for triple in r["received"])
    assert received == sent  # each assignment arrives once, at its expert's rank, for that expert
    assert len(sent) == TOP_K * sum(tokens_per_rank)

    counts_N = torch.bincount(torch.tensor([e for _, _, e in sent]), minlength=NUM_EXPERTS)
    assert counts_N[UNUSED_EXPERT] == 0
    for rank, r in enumerate(results):
        assert torch.equal(r["tokens_per_expert"], counts_N) and r["total_tokens"] == sum(tokens_per_rank)
        num_local = NUM_EXPERTS // ep
        assert torch.equal(r["tokens_per_local_expert"], counts_N[rank * num_local:(rank + 1) * num_local])

        num_tokens = tokens_per_rank[rank]
        experts_TK, weights_TK = routing(rank, num_tokens)
        expected = torch.zeros(num_tokens, 2 + NUM_EXPERTS)
        expected[:, 0] = rank * weights_TK.sum(1)
        expected[:, 1] = torch.arange(num_tokens) * weights_TK.sum(1)
        expected[:, 2:] = torch.zeros(num_tokens, NUM_EXPERTS).scatter(1, experts_TK, weights_TK)
        assert r["out"].shape == (num_tokens, 2 + NUM_EXPERTS)
        assert torch.equal(r["out"], expected), rank  # returned once, to its own token


def test_both_ranks_send_case_makes_every_rank_receive_from_every_rank():
    """The layout that guards the regrouping really has rows crossing both ways for several experts."""
    ep, tokens_per_rank = LAYOUTS["ep2_both_ranks_send"]
    num_local = NUM_EXPERTS // ep
    for source, n in enumerate(tokens_per_rank):
        experts = routing(source, n)[0].reshape(-1)
        for dest in range(ep):
            mine = experts[(experts // num_local) == dest]
            assert mine.unique().numel() >= 2, (source, dest)  # >= 2 local experts: order matters

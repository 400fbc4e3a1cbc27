"""Dispatch conserves assignments: on a real gloo group, with uneven token counts per rank, a rank
with no tokens and an expert that nobody picks, every (token, slot) reaches the rank that owns its
expert exactly once, is computed by that expert, and comes back exactly once to its own token."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_on_ranks
from gatepro_dist.moe.dispatch import combine, dispatch, plan_dispatch

NUM_EXPERTS, TOP_K = 8, 2
TOKENS_PER_RANK = {2: [9, 0], 4: [6, 0, 11, 1]}
UNUSED_EXPERT = NUM_EXPERTS - 1  # never chosen: its rank receives nothing for it


def routing(rank: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (none is UNUSED_EXPERT) and distinct powers-of-two weights."""
    gen = torch.Generator().manual_seed(100 + rank)
    experts_TK = torch.stack([torch.randperm(NUM_EXPERTS - 1, generator=gen)[:TOP_K] for _ in range(num_tokens)]) \
        if num_tokens else torch.zeros(0, TOP_K, dtype=torch.long)
    weights_TK = torch.tensor([[2.0 ** -(slot + 1) for slot in range(TOP_K)]] * num_tokens).reshape(-1, TOP_K)
    return experts_TK, weights_TK


def _worker(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    num_tokens = TOKENS_PER_RANK[world][rank]
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


@pytest.mark.parametrize("ep", [2, 4])
def test_every_token_slot_is_sent_once_and_returned_once(ep):
    results = run_on_ranks(ep, _worker)
    sent = sorted((rank, t, int(e)) for rank, n in enumerate(TOKENS_PER_RANK[ep])
                  for t, row in enumerate(routing(rank, n)[0]) for e in row)
    received = sorted(triple for r in results for triple in r["received"])
    assert received == sent  # each assignment arrives once, at its expert's rank, for that expert
    assert len(sent) == TOP_K * sum(TOKENS_PER_RANK[ep])

    counts_N = torch.bincount(torch.tensor([e for _, _, e in sent]), minlength=NUM_EXPERTS)
    assert counts_N[UNUSED_EXPERT] == 0
    for rank, r in enumerate(results):
        assert torch.equal(r["tokens_per_expert"], counts_N) and r["total_tokens"] == sum(TOKENS_PER_RANK[ep])
        num_local = NUM_EXPERTS // ep
        assert torch.equal(r["tokens_per_local_expert"], counts_N[rank * num_local:(rank + 1) * num_local])

        num_tokens = TOKENS_PER_RANK[ep][rank]
        experts_TK, weights_TK = routing(rank, num_tokens)
        expected = torch.zeros(num_tokens, 2 + NUM_EXPERTS)
        expected[:, 0] = rank * weights_TK.sum(1)
        expected[:, 1] = torch.arange(num_tokens) * weights_TK.sum(1)
        expected[:, 2:] = torch.zeros(num_tokens, NUM_EXPERTS).scatter(1, experts_TK, weights_TK)
        assert r["out"].shape == (num_tokens, 2 + NUM_EXPERTS)
        assert torch.equal(r["out"], expected), rank  # returned once, to its own token

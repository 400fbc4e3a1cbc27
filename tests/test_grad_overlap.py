"""Dense gradient reduction overlaps backward (train/optim.py OverlappedGradReducer) and gives
``reduce_gradients``' result, on real gloo groups at dp x ep = 2 x 1 and 2 x 2, with two
micro-batches: dense gradients averaged over the world, expert gradients (and router rows) over
the expert-data-parallel group only.

Over a group of two ranks the sums are bit-identical (a + b either way). Over four ranks gloo's
ring adds the ranks' contributions to an element in an order that depends on where the element
falls in the buffer's chunks, so a bucket and one flat buffer of all gradients may round
differently: equal to within a few ulp, which is what is asserted there.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks


def _worker(rank: int, world: int, ep: int) -> dict:
    from test_trainer import tiny_config
    from gatepro_dist.moe.router import is_expert_parallel
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.optim import OverlappedGradReducer, reduce_gradients
    from gatepro_dist.train.parallel import build_parallel_groups

    cfg = tiny_config("/tmp/unused", f"parallel.ep={ep}", world_size=world)
    groups = build_parallel_groups(ep)
    reference, overlapped = (Transformer(cfg, groups.ep_group, groups.edp_group) for _ in range(2))
    # Small buckets, so that several reductions start while backward still runs.
    reducer = OverlappedGradReducer(overlapped, groups, bucket_bytes=16 * 1024)
    gen = torch.Generator().manual_seed(100 + rank)  # every rank its own tokens
    micro_batches = [torch.randint(0, cfg.model.vocab_size, (2, 16), generator=gen) for _ in range(2)]

    started_during_backward = []
    for micro, tokens in enumerate(micro_batches):
        for model in (reference, overlapped):
            logits, stats = model(tokens)
            loss = logits.float().square().mean() + sum(s.loss for s in stats)
            if model is overlapped:
                reducer.arm(last_micro_batch=micro == len(micro_batches) - 1)
            (loss / len(micro_batches)).backward()
        started_during_backward.append(sum(b.flat is not None for b in reducer.buckets))
    reduce_gradients(reference, groups)
    reducer.finish()

    ref = dict(reference.named_parameters())
    return {
        "buckets": len(reducer.buckets),
        "started_during_backward": started_during_backward,
        "unequal_expert": [n for n, p in overlapped.named_parameters()
                           if is_expert_parallel(p) and not torch.equal(p.grad, ref[n].grad)],
        "unequal_dense": [n for n, p in overlapped.named_parameters()
                          if not is_expert_parallel(p) and not torch.equal(p.grad, ref[n].grad)],
        "dense_max_rel": max(float((p.grad - ref[n].grad).abs().max() / ref[n].grad.abs().max().clamp_min(1e-30))
                             for n, p in overlapped.named_parameters() if not is_expert_parallel(p)),
        "experts": sum(is_expert_parallel(p) for p in overlapped.parameters()),
    }


@pytest.mark.parametrize("dp,ep", [(2, 1), (2, 2)])
def test_overlapped_reduction_equals_reduce_gradients(dp, ep):
    for rank, result in enumerate(run_on_ranks(dp * ep, _worker, ep)):
        assert result["unequal_expert"] == [], f"rank {rank}: {result}"  # EDP has 2 ranks: exact
        if dp * ep == 2:
            assert result["unequal_dense"] == [], f"rank {rank}: {result}"
        else:  # the world has 4 ranks: same sum, possibly another association (module docstring)
            assert result["dense_max_rel"] <= 5e-7, f"rank {rank}: {result}"
        assert result["experts"] > 0 and result["buckets"] > 2
        first, last = result["started_during_backward"]
        assert first == 0  # the first micro-batch only accumulates
        assert last == result["buckets"]  # every bucket started before the last backward returned

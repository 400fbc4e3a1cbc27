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
        started_during_backward.append(sum(b.starts for b in reducer.buckets))
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


def _collectives_with_an_empty_expert_rank(rank: int, world: int) -> dict:
    """One armed backward at ep=2 where every token goes to rank 0's experts (rank 1's receive no
    rows and build another expert graph): the collectives each rank issues, in order, and how
    many bucket copies were alive at once."""
    import weakref

    import torch.distributed as dist

    from test_trainer import tiny_config
    from gatepro_dist.cluster import faults
    from gatepro_dist.moe import comm
    from gatepro_dist.train import optim
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.parallel import build_parallel_groups

    faults.install("hot_expert:expert=0")  # top-1: every token to expert 0, on EP rank 0
    cfg = tiny_config("/tmp/unused", "parallel.ep=2", "moe.top_k=1", world_size=world)
    groups = build_parallel_groups(2)
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    reducer = optim.OverlappedGradReducer(model, groups, bucket_bytes=16 * 1024)

    issued, rows_received, flats, most_alive = [], [], [], [0]

    def recorded(name, real):
        def call(*args, group=None, **kwargs):
            issued.append((name, tuple(dist.get_process_group_ranks(group))))
            return real(*args, group=group, **kwargs)
        return call

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if output_split_sizes is not None and output.dim() == 2:  # token rows, not the count exchange
            rows_received.append(sum(output_split_sizes))  # dispatch, combine, their backwards
        issued.append(("all_to_all", tuple(dist.get_process_group_ranks(group))))
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def flatten(tensors):  # a bucket's flat copy: how many earlier ones are still alive?
        most_alive[0] = max(most_alive[0], sum(ref() is not None for ref in flats))
        flat = real_flatten(tensors)
        flats.append(weakref.ref(flat))
        return flat

    real_a2a, real_flatten = dist.all_to_all_single, optim._flatten_dense_tensors
    dist.all_to_all_single, optim._flatten_dense_tensors = all_to_all_single, flatten
    dist.all_reduce = recorded("all_reduce", dist.all_reduce)
    comm._all_gather_flat = recorded("all_gather", comm._all_gather_flat)
    comm._reduce_scatter_flat = recorded("reduce_scatter", comm._reduce_scatter_flat)

    tokens = torch.randint(0, cfg.model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(rank))
    logits, stats = model(tokens)
    issued.append(("backward", ()))
    reducer.arm(last_micro_batch=True)
    (logits.float().square().mean() + sum(s.loss for s in stats)).backward()
    reducer.finish()
    # EDP has one rank here (ep = world = 2): expert buckets need no collective, dense ones do.
    dense_buckets = sum(b.group is groups.world_group for b in reducer.buckets)
    return {"issued": issued, "rows_received": rows_received, "dense_buckets": dense_buckets,
            "most_alive": most_alive[0]}


def test_every_rank_issues_the_same_collectives_in_the_same_order_when_one_receives_no_rows():
    """On NCCL two ranks that issue collectives in different orders hang. Rank 1's experts get no
    rows (their graph is a zero-row placeholder, moe/experts.py), yet both ranks issue the same
    sequence: buckets start in index order only (train/optim.py), whatever order the hooks fire.
    And a bucket's flat copy is freed as soon as its reduction is done (on the CPU the reduction
    blocks: no copy outlives its own start), not kept until the end of backward."""
    ranks = run_on_ranks(2, _collectives_with_an_empty_expert_rank)
    dispatched = [r["rows_received"][0::2] for r in ranks]  # forward dispatch, then backward of combine
    assert dispatched[0] and all(n == 2 * 64 for n in dispatched[0])  # both ranks' 4 x 16 tokens
    assert dispatched[1] and all(n == 0 for n in dispatched[1])
    backward_at = ranks[0]["issued"].index(("backward", ()))
    reductions = [c for c in ranks[0]["issued"][backward_at:] if c[0] == "all_reduce"]
    assert len(reductions) == ranks[0]["dense_buckets"] > 2
    assert ranks[0]["issued"] == ranks[1]["issued"]
    # gloo may still hold the last reduced buffer for a moment after the blocking call returns.
    assert all(r["most_alive"] <= 1 for r in ranks), [r["most_alive"] for r in ranks]

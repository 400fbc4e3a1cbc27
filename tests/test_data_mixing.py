"""Mixtures and held-out data: each source's share of the tokens follows its weight, the global
batches do not depend on the world size, a resumed run continues exactly as the uninterrupted
one, and metrics.jsonl carries the tokens each source gave and the validation loss of each."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gatepro_dist.data import BlockOrder, MixtureSampler
from gatepro_dist.data import mixing
from gatepro_dist.train.metrics import METRICS_FILE
from test_trainer import run_training


def test_token_shares_follow_the_weights_over_a_run():
    weights = [0.7, 0.2, 0.1]
    sampler = MixtureSampler([500, 40, 3000], weights, global_batch_size=16, seed=4)
    offsets = np.array([0, 500, 540, 3540])
    for steps in (50, 300):
        blocks = np.concatenate([sampler.global_batch(s) for s in range(steps)])
        per_source = np.bincount(np.searchsorted(offsets, blocks, side="right") - 1, minlength=3)
        shares = per_source / per_source.sum()
        assert np.all(np.abs(shares - weights) <= 0.02), shares
        assert per_source.tolist() == sampler.draws_before(steps).tolist()


def test_each_source_visits_all_its_blocks_once_per_epoch():
    sampler = MixtureSampler([30, 50], [0.5, 0.5], global_batch_size=10, seed=1)
    blocks = np.concatenate([sampler.global_batch(s) for s in range(60)])  # 600 draws: ~10 epochs of a
    first = blocks[blocks < 30][:30]
    assert sorted(first.tolist()) == list(range(30))
    second = blocks[blocks >= 30][:50] - 30
    assert sorted(second.tolist()) == list(range(50))


def test_mixture_global_batches_do_not_depend_on_the_world_size_and_resume():
    args = ([120, 77], [0.6, 0.4], 8)
    single = MixtureSampler(*args, world_size=1, rank=0, seed=3)
    expected = [single.global_batch(s) for s in range(40)]
    ranks = [MixtureSampler(*args, world_size=2, rank=r, seed=3) for r in range(2)]
    assert all(np.array_equal(np.concatenate([r.rank_batch(s) for r in ranks]), expected[s]) for s in range(40))
    for sampler in ranks:  # run 17 steps at world 2, resume at world 4 from the checkpointed state
        for _ in range(17):
            next(sampler)
    resumed = [MixtureSampler(*args, world_size=4, rank=r, seed=0) for r in range(4)]
    for sampler in resumed:
        sampler.load_state_dict(ranks[0].state_dict())
    for step in range(17, 40):
        assert np.array_equal(np.concatenate([next(s) for s in resumed]), expected[step])
    with pytest.raises(ValueError, match="weights"):
        MixtureSampler([120, 77], [0.5, 0.5], 8).load_state_dict(single.state_dict())


def test_a_large_corpus_gets_a_seeded_bijection_instead_of_a_permutation(monkeypatch):
    monkeypatch.setattr(mixing, "PERMUTATION_BLOCKS", 100)
    order = BlockOrder(1000, seed=7)  # above the limit: computed position by position
    epoch0 = order.blocks(np.arange(1000))
    assert sorted(epoch0.tolist()) == list(range(1000)) and not np.array_equal(epoch0, np.arange(1000))
    epoch1 = order.blocks(np.arange(1000, 2000))
    assert sorted(epoch1.tolist()) == list(range(1000)) and not np.array_equal(epoch0, epoch1)
    assert np.array_equal(order.blocks(np.array([5, 1999, 3])), [epoch0[5], epoch1[999], epoch0[3]])
    assert np.array_equal(BlockOrder(1000, seed=7).blocks(np.arange(1000)), epoch0)  # deterministic


def test_small_corpora_keep_the_numpy_permutation_every_run_so_far_used():
    old = np.random.default_rng([3, 2]).permutation(37)  # what GlobalBatchSampler(37, ..., seed=3) used for epoch 2
    assert np.array_equal(BlockOrder(37, seed=3).blocks(np.arange(74, 111)), old)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two training sources (ids < 100 and >= 100, so a row tells where it came from) and a held-out pair."""
    root = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(0)
    for name, low in (("a", 0), ("b", 100), ("va", 0), ("vb", 100)):
        np.save(root / f"{name}.npy", rng.integers(low, low + 100, size=6000).astype(np.uint16))
    return root


def mixture(root) -> list[str]:
    return [f"data.mix=[{{source: {root}/a.npy, weight: 0.75}}, {{source: {root}/b.npy, weight: 0.25}}]",
            f"data.val_source=[{{source: {root}/va.npy, weight: 1}}, {{source: {root}/vb.npy, weight: 1}}]"]


def test_a_mixture_run_logs_tokens_and_validation_per_source_and_resumes_exactly(sources, tmp_path):
    common = [*mixture(sources), "train.eval_every=2", "train.save_every=2", "train.eval_batches=1"]
    whole = run_training(1, tmp_path / "whole", "train.steps=4", *common)
    records = [json.loads(line) for line in (tmp_path / "whole" / METRICS_FILE).read_text().splitlines()]
    tokens = records[-1]["tokens_per_source"]
    assert tokens == {"a": 4 * 6 * 32, "b": 4 * 2 * 32}  # 0.75 and 0.25 of 8 sequences, every step
    per_source = records[1]["val_loss_per_source"]
    assert set(per_source) == {"va", "vb"}
    assert records[1]["val_loss"] == pytest.approx((per_source["va"] + per_source["vb"]) / 2)

    first = run_training(1, tmp_path / "resumed", "train.steps=2", *common)
    rest = run_training(1, tmp_path / "resumed", "train.steps=4", "train.resume=auto", *common)
    assert first + rest == whole  # bit for bit: the sampler state came back with the checkpoint

"""Mixing and sampling: which block each rank trains on at each step, the same at any world size.

BlockOrder(num_blocks, seed, stream=())
    Position p of an endless sequence of epochs -> a block: epoch e = p // num_blocks visits every
    block once, in an order seeded by (seed, *stream, e). Up to PERMUTATION_BLOCKS blocks the order is
    numpy's permutation (what every run so far has seen); above, a seeded bijection (a Feistel network
    with cycle walking) computes any position on demand, so host memory does not grow with the corpus.
GlobalBatchSampler(num_blocks, global_batch_size, world_size=1, rank=0, seed=0)
    Step s's global batch is positions [s*G, (s+1)*G) of the block order; rank r trains on the
    contiguous slice [r*G/W, (r+1)*G/W). No ingredient of the global batch depends on W, so runs at
    different world sizes (and runs resumed at another world size) see the same data.
MixtureSampler(blocks_per_source, weights, global_batch_size, world_size=1, rank=0, seed=0)
    Each global batch holds n_k(s) blocks of source k, n_k(s) in {floor(w_k G), ceil(w_k G)}, chosen by
    systematic sampling with a Weyl-sequence offset, so over S steps a source's share is w_k within
    O(log S / (S G)); each source walks its own BlockOrder; the slots are shuffled within the batch.
    A block is named by a global index: source k's blocks are [offset_k, offset_k + blocks_k).
"""
from __future__ import annotations

import functools
import math

import numpy as np

# Corpora up to this many blocks keep numpy's per-epoch permutation (32 MiB of int64 at the limit).
PERMUTATION_BLOCKS = 1 << 22
GOLDEN = (math.sqrt(5) - 1) / 2  # the Weyl sequence frac(s * GOLDEN) fills [0, 1) most evenly
FEISTEL_ROUNDS = 4


class BlockOrder:
    """Position -> block index for one source; see the module docstring."""

    def __init__(self, num_blocks: int, seed: int, stream: tuple[int, ...] = ()):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the sampler needs at least one block")
        self.num_blocks, self.seed, self.stream = num_blocks, seed, tuple(stream)

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """The whole order of one epoch (materialised: for small corpora and tests)."""
        if self.num_blocks <= PERMUTATION_BLOCKS:
            return _epoch_permutation(self.num_blocks, (self.seed, *self.stream), epoch)
        return _feistel(np.arange(self.num_blocks, dtype=np.uint64), self.num_blocks, self._keys(epoch))

    def blocks(self, positions: np.ndarray) -> np.ndarray:
        """The blocks at `positions` (int64 array), each epoch a fresh order."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_blocks)
        out = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            where = epochs == epoch
            if self.num_blocks <= PERMUTATION_BLOCKS:
                out[where] = self.epoch_permutation(epoch)[offsets[where]]
            else:
                out[where] = _feistel(offsets[where].astype(np.uint64), self.num_blocks, self._keys(epoch))
        return out

    def _keys(self, epoch: int) -> np.ndarray:
        return np.random.SeedSequence([self.seed, *self.stream, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)


@functools.lru_cache(maxsize=8)
def _epoch_permutation(num_blocks: int, seed: tuple[int, ...], epoch: int) -> np.ndarray:
    # SeedSequence([seed, epoch]) gives every (seed, epoch) its own stream, identical on every rank
    # and platform, so ranks agree on the order without communicating.
    permutation = np.random.default_rng([*seed, epoch]).permutation(num_blocks)
    permutation.flags.writeable = False  # cached and shared: nobody may shuffle it in place
    return permutation


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-mixed 64-bit hash (uint64 arithmetic wraps)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(values: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A seeded bijection of [0, n) applied to `values` (uint64): a balanced Feistel network on the
    smallest even number of bits that covers n, walked until the value falls back inside [0, n)
    (at most 4x the domain, so a few rounds on average)."""
    half_bits = max(1, math.ceil(math.ceil(math.log2(max(n, 2))) / 2))
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        with np.errstate(over="ignore"):
            for key in keys:
                left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = permute(values.astype(np.uint64))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = permute(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


class _StepSampler:
    """What both samplers share: the rank slice, micro-batches, iteration and the step counter.

    The only mutable state is `step`, the next step to be served; `next(sampler)` returns this
    rank's block indices for it and advances. The pure methods take an explicit step.
    """

    def __init__(self, global_batch_size: int, world_size: int, rank: int, seed: int):
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.global_batch_size, self.world_size, self.rank, self.seed = global_batch_size, world_size, rank, seed
        self.step = 0

    def global_batch(self, step: int) -> np.ndarray:
        raise NotImplementedError

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def rank_batch(self, step: int) -> np.ndarray:
        share = self.per_rank_batch_size
        return self.global_batch(step)[self.rank * share : (self.rank + 1) * share]

    def micro_batches(self, step: int, grad_accum: int) -> list[np.ndarray]:
        """This rank's slice of step `step`, cut in order into grad_accum equal micro-batches."""
        if grad_accum < 1 or self.per_rank_batch_size % grad_accum:
            raise ValueError(
                f"per-rank batch {self.per_rank_batch_size} (global_batch_size / world_size) "
                f"is not divisible by grad_accum={grad_accum}")
        return np.split(self.rank_batch(step), grad_accum)

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        indices = self.rank_batch(self.step)
        self.step += 1
        return indices

    def _check_resume(self, state: dict, keys: tuple[str, ...]) -> None:
        for key in keys:
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: checkpoint sampler has {key}={state.get(key)}, this run has "
                    f"{getattr(self, key)}; the data order would differ")


class GlobalBatchSampler(_StepSampler):
    """One source: step s serves positions [s*G, (s+1)*G) of its BlockOrder.

    A global batch that straddles an epoch boundary may hold a block twice, once from each epoch;
    every epoch still visits every block exactly once.
    """

    def __init__(self, num_blocks: int, global_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(global_batch_size, world_size, rank, seed)
        self.num_blocks = num_blocks
        self.order = BlockOrder(num_blocks, seed)

    def epoch_of(self, step: int) -> int:
        return step * self.global_batch_size // self.num_blocks

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return self.order.epoch_permutation(epoch)

    def global_batch(self, step: int) -> np.ndarray:
        """The G block indices of step `step`, wrapping into later epochs as needed."""
        start = step * self.global_batch_size
        return self.order.blocks(np.arange(start, start + self.global_batch_size, dtype=np.int64))

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "num_blocks": self.num_blocks,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"]; world_size and rank are this run's own and may differ."""
        self._check_resume(state, ("num_blocks", "global_batch_size"))
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.order = BlockOrder(self.num_blocks, self.seed)


class MixtureSampler(_StepSampler):
    """Several sources drawn by weight; see the module docstring."""

    def __init__(self, blocks_per_source: list[int], weights: list[float], global_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(global_batch_size, world_size, rank, seed)
        if len(blocks_per_source) != len(weights) or not weights:
            raise ValueError("a mixture needs one weight per source and at least one source")
        if any(w <= 0 or not math.isfinite(w) for w in weights):
            raise ValueError(f"mixture weights {weights} must all be positive")
        self.blocks_per_source = [int(b) for b in blocks_per_source]
        self.weights = [float(w) for w in weights]
        cumulative = np.cumsum(np.asarray(self.weights) / sum(self.weights))
        cumulative[-1] = 1.0  # exactly, so the counts of a step always add up to G
        self._edges = np.concatenate([[0.0], cumulative]) * global_batch_size
        self._offsets = np.concatenate([[0], np.cumsum(self.blocks_per_source)]).astype(np.int64)
        self._phase = float(np.random.default_rng([seed, 0x6D6978]).random())
        self._cache = (0, np.zeros(len(weights), dtype=np.int64))  # (step, draws of each source before it)
        self._reseed()

    def _reseed(self) -> None:
        self.orders = [BlockOrder(n, self.seed, (k + 1,)) for k, n in enumerate(self.blocks_per_source)]

    def counts(self, steps: np.ndarray) -> np.ndarray:
        """[len(steps), K] blocks of each source in each step: floor(edge_k + u) differences."""
        u = np.modf(np.asarray(steps, dtype=np.float64) * GOLDEN + self._phase)[0]
        floors = np.floor(self._edges[None, :] + u[:, None]).astype(np.int64)
        return np.diff(floors, axis=1)

    def draws_before(self, step: int) -> np.ndarray:
        """[K] blocks each source served in steps [0, step): summed in chunks, cached for the next step."""
        cached_step, cached = self._cache
        if step < cached_step:
            cached_step, cached = 0, np.zeros_like(cached)
        chunk = 1 << 20
        while cached_step < step:
            stop = min(step, cached_step + chunk)
            cached = cached + self.counts(np.arange(cached_step, stop)).sum(axis=0)
            cached_step = stop
        self._cache = (cached_step, cached)
        return cached

    def tokens_per_source(self, steps_done: int, tokens_per_block: int) -> list[int]:
        return (self.draws_before(steps_done) * tokens_per_block).tolist()

    def global_batch(self, step: int) -> np.ndarray:
        counts = self.counts(np.array([step]))[0]
        first = self.draws_before(step)
        pieces = [self._offsets[k] + self.orders[k].blocks(np.arange(first[k], first[k] + n, dtype=np.int64))
                  for k, n in enumerate(counts.tolist())]
        batch = np.concatenate(pieces)
        # Interleave the sources so that every rank's slice (and micro-batch) holds a mixture.
        return batch[np.random.default_rng([self.seed, 0x6D6978, step]).permutation(len(batch))]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "blocks_per_source": self.blocks_per_source,
                "weights": self.weights, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"]: the draws before it follow from the step (nothing else to restore)."""
        self._check_resume(state, ("blocks_per_source", "weights", "global_batch_size"))
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self._phase = float(np.random.default_rng([self.seed, 0x6D6978]).random())
        self._cache = (0, np.zeros(len(self.weights), dtype=np.int64))
        self._reseed()

"""The batch the model sees: blocks of seq_len + 1 tokens cut into inputs and shifted targets, the
document layout inside a row (positions that restart at each document, a block-causal mask), and a
loader that prepares the next micro-batches in the background.

make_batch(stream, block_indices, seq_len) -> (inputs_BT, targets_BT) as int64 tensors.
document_layout(tokens_BS, eos_id) -> (positions_BS, mask_B1SS): a token after an end-of-document
    token starts a new document at position 0; the mask lets a query see the keys of its own
    document at or before it (block-causal). Pure tensor code on the tokens' device: no host read.
byte_unigram_entropy(stream, *, start=0, stop=None, max_tokens=4 Mi) -> float, in NATS.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .sources import TokenStream
from .text import DataError


class BlockView:
    """Blocks [first_block, first_block + num_blocks) of a stream, each seq_len + 1 tokens long.

    ``vocab_limit`` (set when the source's largest id is not known up front) checks every batch and
    stops at the first token the model has no embedding for.
    """

    def __init__(self, stream: TokenStream, seq_len: int, first_block: int, num_blocks: int,
                 vocab_limit: int | None = None, name: str | None = None):
        self.stream, self.seq_len = stream, seq_len
        self.first_block, self.num_blocks = first_block, num_blocks
        self.vocab_limit, self.name = vocab_limit, name

    def __len__(self) -> int:
        return self.num_blocks

    def __repr__(self) -> str:
        last_block = self.first_block + self.num_blocks - 1
        return f"BlockView(blocks {self.first_block}..{last_block}, seq_len={self.seq_len})"

    @property
    def eos_id(self) -> int | None:
        return self.stream.eos_id

    @property
    def token_range(self) -> tuple[int, int]:
        block_tokens = self.seq_len + 1
        return self.first_block * block_tokens, (self.first_block + self.num_blocks) * block_tokens

    def batch(self, block_indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) for blocks numbered within this view (0 .. len - 1)."""
        local = np.asarray(block_indices, dtype=np.int64)
        if local.size and (local.min() < 0 or local.max() >= self.num_blocks):
            raise IndexError(f"block indices must lie in [0, {self.num_blocks}); got {local.min()}..{local.max()}")
        inputs, targets = make_batch(self.stream, local + self.first_block, self.seq_len)
        if self.vocab_limit is not None and inputs.numel():
            largest = int(max(inputs.max(), targets.max()))
            if largest >= self.vocab_limit:
                raise DataError(f"data source {self.stream.description} contains token id {largest} (in blocks "
                                f"{(local + self.first_block).tolist()}), outside vocab_size={self.vocab_limit}; "
                                f"raise model.vocab_size to at least {largest + 1}")
        return inputs, targets

    def in_order_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every block once, in order: what evaluation wants (the last batch may be smaller)."""
        for start in range(0, self.num_blocks, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, self.num_blocks)))

    def unigram_entropy(self, max_tokens: int = 4 << 20) -> float:
        start, stop = self.token_range
        return byte_unigram_entropy(self.stream, start=start, stop=stop, max_tokens=max_tokens)

    def make_sampler(self, global_batch_size: int, seed: int):
        from .mixing import GlobalBatchSampler

        return GlobalBatchSampler(len(self), global_batch_size, 1, 0, seed)


def make_batch(
    stream: TokenStream, block_indices: Sequence[int] | np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BT, targets_BT): block b's tokens [b*(T+1), (b+1)*(T+1)) cut into x and x shifted by one."""
    block_tokens = seq_len + 1
    rows = [stream.slice(b * block_tokens, (b + 1) * block_tokens) for b in np.asarray(block_indices).tolist()]
    blocks_BT1 = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, block_tokens), dtype=np.int64))
    return blocks_BT1[:, :-1].contiguous(), blocks_BT1[:, 1:].contiguous()


def byte_unigram_entropy(
    stream: TokenStream, *, start: int = 0, stop: int | None = None, max_tokens: int = 4 << 20
) -> float:
    """Entropy in NATS of the token frequencies in [start, stop), reading at most max_tokens.

    Nats, not bits, so it is directly comparable with a cross-entropy loss: a model that has
    learned nothing but token frequencies reaches this loss. Bits = nats / ln 2.
    """
    stop = len(stream) if stop is None else stop
    tokens = stream.slice(start, min(stop, start + max_tokens))
    if tokens.size == 0:
        raise ValueError("byte_unigram_entropy needs at least one token")
    probabilities = np.bincount(tokens) / tokens.size
    probabilities = probabilities[probabilities > 0]
    return float(-(probabilities * np.log(probabilities)).sum())


# ---------------------------------------------------------------------------- documents in a row


def document_layout(tokens_BS: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions_BS, mask_B1SS) of rows whose documents end with `eos_id`; see the module docstring.

    A row that starts inside a document (the usual case for a block cut from a stream) treats its
    first token as position 0 of that document: the block never sees the part before it anyway.
    """
    batch, seq = tokens_BS.shape
    starts_BS = torch.zeros_like(tokens_BS, dtype=torch.bool)
    starts_BS[:, 1:] = tokens_BS[:, :-1] == eos_id
    document_BS = starts_BS.cumsum(dim=1)
    index_S = torch.arange(seq, device=tokens_BS.device)
    first_BS = torch.where(starts_BS, index_S, torch.zeros_like(index_S)).cummax(dim=1).values
    positions_BS = index_S - first_BS
    same_document_BSS = document_BS[:, :, None] == document_BS[:, None, :]
    causal_SS = torch.ones(seq, seq, dtype=torch.bool, device=tokens_BS.device).tril()
    return positions_BS, (same_document_BSS & causal_SS).unsqueeze(1)


# ---------------------------------------------------------------------------- background loading


class PrefetchingView:
    """A training view whose next micro-batches are read by a background thread.

    ``batch(part)`` returns exactly what ``view.batch(part)`` returns: a part that was predicted is
    taken from the thread's results, anything else is read on the spot. The prediction follows the
    sampler: after serving micro-batch m of step s it asks for the next `depth` micro-batches.
    ``pin`` (on CUDA) pins the host tensors so that the copy to the device can run without blocking.
    """

    def __init__(self, view, sampler, parts_of_step: Callable[[int], list[np.ndarray]], depth: int = 2,
                 pin: bool = False):
        self.view, self.sampler, self.parts_of_step = view, sampler, parts_of_step
        self.depth, self.pin = depth, pin
        self._pending: dict[bytes, Future] = {}
        self._where: dict[bytes, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gatepro-data")

    def __len__(self) -> int:
        return len(self.view)

    def __getattr__(self, name):  # everything else (sources, names, sampler factory) is the view's
        return getattr(self.view, name)

    def _read(self, part: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.view.batch(part)
        if self.pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs, targets

    def _locate(self, key: bytes, part: np.ndarray) -> tuple[int, int] | None:
        if key in self._where:
            return self._where[key]
        step = self.sampler.step
        for micro, candidate in enumerate(self.parts_of_step(step)):
            if np.array_equal(candidate, part):
                return step, micro
        return None

    def _schedule(self, step: int, micro: int) -> None:
        parts = self.parts_of_step(step)
        for _ in range(self.depth):
            micro += 1
            if micro == len(parts):
                step, micro, parts = step + 1, 0, self.parts_of_step(step + 1)
            part = parts[micro]
            key = part.tobytes()
            if key not in self._pending:
                self._where[key] = (step, micro)
                self._pending[key] = self._pool.submit(self._read, part)

    def batch(self, part) -> tuple[torch.Tensor, torch.Tensor]:
        part = np.asarray(part, dtype=np.int64)
        key = part.tobytes()
        with self._lock:
            future = self._pending.pop(key, None)
            where = self._locate(key, part)
            self._where.pop(key, None)
            if where is not None:
                self._schedule(*where)
        return future.result() if future is not None else self._read(part)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

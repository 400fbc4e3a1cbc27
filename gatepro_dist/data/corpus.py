"""The corpus a run trains and evaluates on, built from the `data` section of the config.

build_data(source, seq_len, val_fraction=0.1, *, vocab_size=None, **load_kwargs) -> DataSplit(train, val)
    Cuts one source's stream into contiguous blocks of seq_len + 1 tokens (inputs plus the shifted
    target) and keeps the LAST `val_fraction` of blocks (at least one) for validation: the simplest
    rule that is obviously disjoint from training and identical on every rank and every machine.
data_from_config(cfg) -> DataSplit
    `data.source`, or the `data.mix` entries (each split as above, then drawn by weight:
    MixtureView), with `data.val_source` (one source or a mixture), when set, as the held-out data
    instead of the tails. Every check that can fail on the user's data runs here, before any process
    group exists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .batch import BlockView
from .mixing import MixtureSampler
from .sources import TokenStream, load_tokens
from .text import DataError


class DataSplit(NamedTuple):
    train: object  # BlockView or MixtureView
    val: object  # BlockView or MixtureVal


def split_blocks(num_blocks: int, val_fraction: float) -> tuple[int, int]:
    """(train_blocks, val_blocks): validation is the tail, at least one block, never all of them."""
    if num_blocks < 2:
        raise DataError(f"num_blocks={num_blocks}: a split needs at least one training and one validation block")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    val_blocks = min(num_blocks - 1, max(1, round(num_blocks * val_fraction)))
    return num_blocks - val_blocks, val_blocks


def _count_blocks(stream: TokenStream, seq_len: int, needed: int) -> int:
    num_blocks = len(stream) // (seq_len + 1)
    if num_blocks < needed:
        what = "one training and one validation block" if needed == 2 else "one block"
        raise DataError(
            f"data source {stream.description} has {len(stream)} tokens, fewer than the {needed * (seq_len + 1)} "
            f"needed for {what} at seq_len={seq_len}; use more data or a smaller seq_len")
    return num_blocks


def _vocab_limit(stream: TokenStream, vocab_size: int | None) -> int | None:
    """Check the largest id now when it is known or cheap to find; else leave it to every batch."""
    if vocab_size is None:
        return None
    largest = stream.max_token_if_cheap()
    if largest is None:
        return vocab_size
    if largest >= vocab_size:
        raise DataError(
            f"data source {stream.description} contains token id {largest}, outside "
            f"vocab_size={vocab_size}; raise model.vocab_size to at least {largest + 1}")
    return None


def build_data(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    seq_len: int,
    val_fraction: float = 0.1,
    *,
    vocab_size: int | None = None,
    **load_kwargs,
) -> DataSplit:
    """Load `source`, check it fits the model, and split it into train and validation blocks."""
    if seq_len < 1:
        raise DataError(f"seq_len={seq_len} must be at least 1")
    stream = load_tokens(source, **load_kwargs)
    num_blocks = _count_blocks(stream, seq_len, 2)
    limit = _vocab_limit(stream, vocab_size)
    train_blocks, val_blocks = split_blocks(num_blocks, val_fraction)
    train = BlockView(stream, seq_len, first_block=0, num_blocks=train_blocks, vocab_limit=limit)
    val = BlockView(stream, seq_len, first_block=train_blocks, num_blocks=val_blocks, vocab_limit=limit)
    return DataSplit(train, val)


def whole(source, seq_len: int, *, vocab_size: int | None = None, name: str | None = None, **load_kwargs) -> BlockView:
    """Every block of `source` (a held-out set, or a training source when validation is elsewhere)."""
    stream = load_tokens(source, **load_kwargs)
    num_blocks = _count_blocks(stream, seq_len, 1)
    return BlockView(stream, seq_len, 0, num_blocks, _vocab_limit(stream, vocab_size), name)


class MixtureView:
    """Several training views behind one global block index (source k: [offset_k, offset_k + len_k))."""

    def __init__(self, views: list[BlockView], weights: list[float], names: list[str]):
        self.views, self.weights, self.names = views, weights, names
        self.offsets = np.concatenate([[0], np.cumsum([len(v) for v in views])]).astype(np.int64)
        self.sampler: MixtureSampler | None = None
        self.seq_len = views[0].seq_len

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def eos_id(self) -> int | None:
        ids = {v.eos_id for v in self.views}
        return ids.pop() if len(ids) == 1 else None

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows in the order asked, each read from its own source."""
        indices = np.asarray(indices, dtype=np.int64)
        source = np.searchsorted(self.offsets, indices, side="right") - 1
        inputs = torch.empty((len(indices), self.seq_len), dtype=torch.long)
        targets = torch.empty_like(inputs)
        for k in np.unique(source).tolist():
            rows = np.flatnonzero(source == k)
            x, y = self.views[k].batch(indices[rows] - self.offsets[k])
            inputs[torch.from_numpy(rows)], targets[torch.from_numpy(rows)] = x, y
        return inputs, targets

    def make_sampler(self, global_batch_size: int, seed: int) -> MixtureSampler:
        self.sampler = MixtureSampler([len(v) for v in self.views], self.weights, global_batch_size, 1, 0, seed)
        return self.sampler

    def tokens_per_source(self, steps_done: int) -> dict[str, int]:
        """Training tokens (inputs) each source has given up to `steps_done` steps."""
        counts = self.sampler.tokens_per_source(steps_done, self.seq_len) if self.sampler else [0] * len(self.views)
        return dict(zip(self.names, counts))


class MixtureVal:
    """Held-out views, one per source: evaluation reports each and their weighted mean."""

    def __init__(self, views: list[BlockView], weights: list[float], names: list[str]):
        self.views, self.weights, self.names = views, weights, names

    def __len__(self) -> int:
        return sum(len(v) for v in self.views)


def source_name(source) -> str:
    """A short name for a source in metrics: its last path component (without shard suffixes)."""
    first = source if isinstance(source, str) else source[0]
    name = Path(str(first).rstrip("/")).name
    for suffix in (".jsonl.gz", ".jsonl", ".bin", ".npy", ".txt"):
        name = name.removesuffix(suffix)
    return name or str(first)


def _names(entries) -> list[str]:
    names = [e.name or source_name(e.source) for e in entries]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # two shards called train.bin in different folders: train, train_2
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}_{seen[name]}"
    return names


def _resolve_eos(cfg, streams: list[TokenStream]) -> int | None:
    """The end-of-document id that document masking uses: data.eos_id, else the sources' own."""
    d = cfg.data
    if d.eos_id is not None:
        return d.eos_id
    found = {s.eos_id for s in streams}
    if len(found) == 1 and None not in found:
        return found.pop()
    if d.document_mask:
        hint = ""
        if d.tokenizer is not None:
            from .text import HFTokenizer

            eos = HFTokenizer(d.tokenizer).eos_id
            hint = f" (the tokenizer's end-of-document token is {eos}: data.eos_id={eos})" if eos is not None else ""
        raise DataError(
            "data.document_mask=true needs an end-of-document token id, and the data source names none; set "
            f"data.eos_id{hint}, or tokenize the corpus with gatepro-convert tokenize (its manifest names one)")
    return None


def data_from_config(cfg) -> DataSplit:
    """Train and validation views of the configured corpus (raises DataError on bad data)."""
    d = cfg.data
    common = dict(bin_dtype=d.bin_dtype, max_bytes=d.max_bytes, tokenizer=d.tokenizer, text_key=d.text_key,
                  eos_id=d.eos_id)
    vocab = cfg.model.vocab_size
    val_entries = _entries(d.val_source) if d.val_source is not None else None
    if not d.mix and val_entries is None:  # one source with its tail held out: every run so far
        split = build_data(d.source, d.seq_len, d.val_fraction, vocab_size=vocab, **common)
        _set_eos(cfg, [split.train.stream])
        return split

    train_entries = d.mix if d.mix else _entries(d.source)
    names = _names(train_entries)
    if val_entries is None:  # each source's tail is its validation set
        splits = [build_data(e.source, d.seq_len, d.val_fraction, vocab_size=vocab, **common) for e in train_entries]
        train_views, val_views = [s.train for s in splits], [s.val for s in splits]
        val_names, val_weights = names, [e.weight for e in train_entries]
    else:
        train_views = [whole(e.source, d.seq_len, vocab_size=vocab, **common) for e in train_entries]
        val_views = [whole(e.source, d.seq_len, vocab_size=vocab, **common) for e in val_entries]
        val_names, val_weights = _names(val_entries), [e.weight for e in val_entries]
    for view, name in zip(train_views, names):
        view.name = name
    for view, name in zip(val_views, val_names):
        view.name = name
    _set_eos(cfg, [v.stream for v in train_views + val_views])
    train = train_views[0] if not d.mix else MixtureView(train_views, [e.weight for e in train_entries], names)
    val = val_views[0] if len(val_views) == 1 else MixtureVal(val_views, val_weights, val_names)
    return DataSplit(train, val)


def _entries(source) -> list:
    """A source setting as mixture entries: a list of {source, weight} stays, anything else is one entry."""
    from ..config import MixEntry

    if isinstance(source, list) and source and isinstance(source[0], MixEntry):
        return source
    return [MixEntry(source=source, weight=1.0)]


def _set_eos(cfg, streams: list[TokenStream]) -> None:
    """Resolve the end-of-document id into the config (so the model and config.yaml see it)."""
    eos = _resolve_eos(cfg, streams)
    if cfg.data.document_mask:
        cfg.data.eos_id = eos

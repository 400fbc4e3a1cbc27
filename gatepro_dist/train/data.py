"""Training data: token sources, a deterministic train/validation split, and a
data-parallel sampler whose global batch does not depend on the world size.

Public API
----------
load_tokens(source, *, bin_dtype="uint16", max_bytes=16 MiB, suffixes=(".txt", ".py", ".md"), tokenizer=None) -> TokenStream
    source is "stdlib" (the Python standard library's own source, byte-level), a path, or a list
    of paths. Files ending in ".bin" are pre-tokenized memory-mapped arrays of `bin_dtype`;
    every other file is read as bytes (vocab 256), or, when `tokenizer` names a local
    tokenizer.json, encoded with it (the Hugging Face `tokenizers` library); directories are
    expanded recursively, sorted, keeping files whose name ends in one of `suffixes`.
build_data(source, seq_len, val_fraction=0.1, *, vocab_size=None, **load_kwargs) -> DataSplit(train, val)
    Cuts the stream into contiguous blocks of seq_len + 1 tokens (inputs plus the shifted target)
    and keeps the LAST `val_fraction` of blocks (at least one) for validation. The tail is used,
    rather than a scattered subset, because it is the simplest rule that is obviously disjoint
    from training and identical on every rank and every machine.
GlobalBatchSampler(num_blocks, global_batch_size, world_size=1, rank=0, seed=0)
    Step s's global batch is positions [s*G, (s+1)*G) of an endless sequence of per-epoch
    permutations seeded by (seed, epoch); rank r trains on the contiguous slice
    [r*G/W, (r+1)*G/W). Because no ingredient of the global batch depends on W, runs at different
    world sizes (and runs resumed at a different world size) see exactly the same data.
make_batch(stream, block_indices, seq_len) -> (inputs_BT, targets_BT) as int64 tensors.
byte_unigram_entropy(stream, *, start=0, stop=None, max_tokens=4 Mi) -> float, in NATS
    (divide by ln 2 for bits) so it compares directly with a cross-entropy loss.

Every problem with the user's data raises DataError (a ValueError) with a one-line message that
names the path and the fix.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_SUFFIXES = (".txt", ".py", ".md")
BIN_DTYPES = ("uint8", "uint16", "uint32")
FILE_SEPARATOR = b"\n\n"
# Directories left out of the stdlib corpus: third-party packages differ between machines, and the
# test suites / IDLE / lib2to3 are large, unusual code that would dominate a small corpus.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
# How much of each text file is inspected to decide whether it is really text.
BINARY_SNIFF_BYTES = 64 << 10
BINARY_CONTROL_FRACTION = 0.30
# Control bytes that ordinary text does contain: tab, LF, FF, CR, ESC (terminal colours).
TEXT_CONTROL_BYTES = (9, 10, 12, 13, 27)


class DataError(ValueError):
    """The user's data cannot be used; the message names the path and the fix."""


class TokenStream:
    """One logical 1-D token sequence made of one or more arrays (byte buffers or memmaps).

    Memmapped parts stay on disk; only the slices asked for are copied into memory.
    """

    def __init__(self, parts: Sequence[np.ndarray], description: str, byte_level: bool):
        self.parts = tuple(parts)
        self.description = description
        self.byte_level = byte_level
        lengths = [len(part) for part in self.parts]
        self.part_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._max_token: int | None = None  # computed on first use: a full pass over a memmap

    def __len__(self) -> int:
        return int(self.part_starts[-1])

    def __repr__(self) -> str:
        return f"TokenStream({self.description}, {len(self)} tokens)"

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, stitched across part boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"slice [{start}, {stop}) outside a stream of {len(self)} tokens")
        pieces = []
        part = int(np.searchsorted(self.part_starts, start, side="right")) - 1
        while start < stop:
            part_start = int(self.part_starts[part])
            take_until = min(stop, int(self.part_starts[part + 1]))
            pieces.append(self.parts[part][start - part_start : take_until - part_start])
            start, part = take_until, part + 1
        if not pieces:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(pieces).astype(np.int64)

    def max_token(self) -> int:
        """Largest token id, read in chunks so a memmapped corpus is never loaded whole."""
        if self._max_token is None:
            chunk = 16 << 20
            chunk_maxima = (
                int(part[i : i + chunk].max()) for part in self.parts for i in range(0, len(part), chunk)
            )
            self._max_token = max(chunk_maxima, default=0)
        return self._max_token


# ---------------------------------------------------------------------------- sources


def files_under(root: Path, suffixes: Sequence[str], excluded_dirs: frozenset[str] = frozenset()) -> list[str]:
    """Sorted POSIX paths, relative to root, of files ending in one of `suffixes`.

    Sorting relative paths (not walk order, which depends on the file system) is what makes the
    corpus byte-identical on every machine; os.walk also does not follow symlinked directories.
    """
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in excluded_dirs]
        matching = [f for f in files if f.endswith(tuple(suffixes))]
        found += [(Path(directory) / f).relative_to(root).as_posix() for f in matching]
    return sorted(found)


def stdlib_corpus_files(root: str | os.PathLike | None = None) -> list[str]:
    """The default corpus's files: every *.py under `root` (default: this Python's stdlib)."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return files_under(root, (".py",), STDLIB_EXCLUDED_DIRS)


def _describe_paths(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _expand(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """A file names itself; a directory names its matching files, recursively and sorted."""
    if not path.exists():
        raise DataError(
            f"data source {path} does not exist; pass an existing file or directory, "
            "or 'stdlib' for the built-in corpus"
        )
    if path.is_file():
        return [path]
    files = [path / relative for relative in files_under(path, suffixes)]
    if not files:
        raise DataError(
            f"data directory {path} holds no files ending in {', '.join(suffixes)}; "
            "add some, or pass suffixes= to accept other extensions"
        )
    return files


def looks_binary(head: bytes) -> bool:
    """True when more than 30% of `head` is NUL or control bytes that text does not contain."""
    if not head:
        return False
    byte_values = np.frombuffer(head, dtype=np.uint8)
    control = ((byte_values < 32) & ~np.isin(byte_values, TEXT_CONTROL_BYTES)) | (byte_values == 127)
    return control.mean() > BINARY_CONTROL_FRACTION


def _read_text_bytes(files: Sequence[Path], max_bytes: int) -> bytes:
    """Files joined by FILE_SEPARATOR, in order, stopping (and truncating) at max_bytes."""
    chunks, total = [], 0
    for file in files:
        content = file.read_bytes()
        if looks_binary(content[:BINARY_SNIFF_BYTES]):
            raise DataError(
                f"text file {file} looks binary (over 30% control bytes); "
                f"pre-tokenized data must be a .bin file of {'/'.join(BIN_DTYPES)} tokens"
            )
        total += len(content) + (len(FILE_SEPARATOR) if chunks else 0)
        chunks.append(content)
        if total >= max_bytes:
            break
    return FILE_SEPARATOR.join(chunks)[:max_bytes]


def _memmap_bin(file: Path, bin_dtype: str) -> np.ndarray:
    itemsize = np.dtype(bin_dtype).itemsize
    size = file.stat().st_size
    if size == 0:
        raise DataError(f"token file {file} is empty; write tokens into it or remove it from the data source")
    if size % itemsize:
        raise DataError(
            f"token file {file} has {size} bytes, not a multiple of {itemsize} for {bin_dtype}; "
            "set bin_dtype to the dtype it was written with"
        )
    return np.memmap(file, dtype=bin_dtype, mode="r")


# Text is encoded in pieces of about this many characters, cut after a newline, so the Rust
# tokenizer can spread them over threads (a cut changes at most the tokens around one newline).
ENCODE_PIECE_CHARS = 1 << 16


def load_text_tokenizer(path: str | os.PathLike):
    """A `tokenizers.Tokenizer` from a local tokenizer.json (nothing is downloaded)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataError(
            f"data.tokenizer={path} needs the `tokenizers` library; pip install 'gatepro_dist[hf]'"
        ) from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the library raises a plain Exception for unreadable files
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"tokenizer {path} cannot be read ({first_line}); point it at a tokenizer.json") from None


def encode_text(data: bytes, tokenizer) -> np.ndarray:
    """Token ids of UTF-8 `data` (invalid bytes become U+FFFD) under `tokenizer`, as uint32."""
    text = data.decode("utf-8", errors="replace")
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + ENCODE_PIECE_CHARS)
        stop = len(text) if cut < 0 else cut + 1
        pieces.append(text[start:stop])
        start = stop
    encodings = tokenizer.encode_batch(pieces, add_special_tokens=False)
    ids = [np.asarray(e.ids, dtype=np.uint32) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)


def _text_stream(data: bytes, description: str, tokenizer: str | os.PathLike | None) -> TokenStream:
    if tokenizer is None:
        return TokenStream([np.frombuffer(data, dtype=np.uint8)], description, byte_level=True)
    ids = encode_text(data, load_text_tokenizer(tokenizer))
    return TokenStream([ids], f"{description}, encoded with {tokenizer}", byte_level=False)


def load_tokens(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    bin_dtype: str = "uint16",
    max_bytes: int = DEFAULT_MAX_BYTES,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    tokenizer: str | os.PathLike | None = None,
) -> TokenStream:
    """The tokens named by `source`; see the module docstring for what a source may be."""
    if bin_dtype not in BIN_DTYPES:
        raise DataError(f"bin_dtype {bin_dtype!r} is not supported; use one of {', '.join(BIN_DTYPES)}")
    if max_bytes < 1:
        raise DataError(f"max_bytes={max_bytes} leaves no data; pass a positive byte budget")
    if isinstance(source, str) and source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [root / rel for rel in stdlib_corpus_files(root)]
        data = _read_text_bytes(files, max_bytes)
        description = f"stdlib corpus of Python {sysconfig.get_python_version()} ({root})"
        return _text_stream(data, description, tokenizer)

    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise DataError("data source is an empty list; name at least one file or directory, or 'stdlib'")
    files = [file for path in paths for file in _expand(path, suffixes)]
    named = _describe_paths(paths)
    is_bin = [file.suffix == ".bin" for file in files]
    if any(is_bin) and not all(is_bin):
        raise DataError(
            f"data source {named} mixes .bin token files with text files; their vocabularies differ, so use one kind"
        )

    if all(is_bin):
        parts = [_memmap_bin(file, bin_dtype) for file in files]
        stream = TokenStream(parts, f"{len(files)} {bin_dtype} token file(s): {named}", byte_level=False)
    else:
        data = _read_text_bytes(files, max_bytes)
        stream = _text_stream(data, f"{len(files)} text file(s): {named}", tokenizer)
    if len(stream) == 0:
        raise DataError(f"data source {named} contains no bytes; point it at non-empty files")
    return stream


# ---------------------------------------------------------------------------- split


class BlockView:
    """Blocks [first_block, first_block + num_blocks) of a stream, each seq_len + 1 tokens long."""

    def __init__(self, stream: TokenStream, seq_len: int, first_block: int, num_blocks: int):
        self.stream, self.seq_len = stream, seq_len
        self.first_block, self.num_blocks = first_block, num_blocks

    def __len__(self) -> int:
        return self.num_blocks

    def __repr__(self) -> str:
        last_block = self.first_block + self.num_blocks - 1
        return f"BlockView(blocks {self.first_block}..{last_block}, seq_len={self.seq_len})"

    @property
    def token_range(self) -> tuple[int, int]:
        block_tokens = self.seq_len + 1
        return self.first_block * block_tokens, (self.first_block + self.num_blocks) * block_tokens

    def batch(self, block_indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_BT, targets_BT) for blocks numbered within this view (0 .. len - 1)."""
        local = np.asarray(block_indices, dtype=np.int64)
        if local.size and (local.min() < 0 or local.max() >= self.num_blocks):
            raise IndexError(f"block indices must lie in [0, {self.num_blocks}); got {local.min()}..{local.max()}")
        return make_batch(self.stream, local + self.first_block, self.seq_len)

    def in_order_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every block once, in order: what evaluation wants (the last batch may be smaller)."""
        for start in range(0, self.num_blocks, batch_size):
            yield self.batch(np.arange(start, min(start + batch_size, self.num_blocks)))

    def unigram_entropy(self, max_tokens: int = 4 << 20) -> float:
        start, stop = self.token_range
        return byte_unigram_entropy(self.stream, start=start, stop=stop, max_tokens=max_tokens)


class DataSplit(NamedTuple):
    train: BlockView
    val: BlockView


def split_blocks(num_blocks: int, val_fraction: float) -> tuple[int, int]:
    """(train_blocks, val_blocks): validation is the tail, at least one block, never all of them."""
    if num_blocks < 2:
        raise DataError(f"num_blocks={num_blocks}: a split needs at least one training and one validation block")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must lie strictly between 0 and 1")
    val_blocks = min(num_blocks - 1, max(1, round(num_blocks * val_fraction)))
    return num_blocks - val_blocks, val_blocks


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
    num_blocks = len(stream) // (seq_len + 1)
    if num_blocks < 2:
        raise DataError(
            f"data source {stream.description} has {len(stream)} tokens, fewer than the {2 * (seq_len + 1)} "
            f"needed for one training and one validation block at seq_len={seq_len}; "
            "use more data or a smaller seq_len"
        )
    if vocab_size is not None and stream.max_token() >= vocab_size:
        raise DataError(
            f"data source {stream.description} contains token id {stream.max_token()}, outside "
            f"vocab_size={vocab_size}; raise model.vocab_size to at least {stream.max_token() + 1}"
        )
    train_blocks, val_blocks = split_blocks(num_blocks, val_fraction)
    train = BlockView(stream, seq_len, first_block=0, num_blocks=train_blocks)
    val = BlockView(stream, seq_len, first_block=train_blocks, num_blocks=val_blocks)
    return DataSplit(train, val)


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


# ---------------------------------------------------------------------------- sampler


class GlobalBatchSampler:
    """Which blocks each rank trains on at each optimizer step; see the module docstring.

    A global batch that straddles an epoch boundary may hold a block twice, once from each epoch;
    every epoch still visits every block exactly once.

    The only mutable state is `step`, the next step to be served; `next(sampler)` returns this
    rank's block indices for it and advances. The pure methods take an explicit step.
    """

    def __init__(
        self, num_blocks: int, global_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: the sampler needs at least one block")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of world_size={world_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        self.num_blocks, self.global_batch_size = num_blocks, global_batch_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.step = 0

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def epoch_of(self, step: int) -> int:
        return step * self.global_batch_size // self.num_blocks

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        return _epoch_permutation(self.num_blocks, self.seed, epoch)

    def global_batch(self, step: int) -> np.ndarray:
        """The G block indices of step `step`, wrapping into later epochs as needed."""
        pieces, position = [], step * self.global_batch_size
        end = position + self.global_batch_size
        while position < end:
            epoch, offset = divmod(position, self.num_blocks)
            take = min(end - position, self.num_blocks - offset)
            pieces.append(self.epoch_permutation(epoch)[offset : offset + take])
            position += take
        return np.concatenate(pieces)

    def rank_batch(self, step: int) -> np.ndarray:
        share = self.per_rank_batch_size
        return self.global_batch(step)[self.rank * share : (self.rank + 1) * share]

    def micro_batches(self, step: int, grad_accum: int) -> list[np.ndarray]:
        """This rank's slice of step `step`, cut in order into grad_accum equal micro-batches."""
        if grad_accum < 1 or self.per_rank_batch_size % grad_accum:
            raise ValueError(
                f"per-rank batch {self.per_rank_batch_size} (global_batch_size / world_size) "
                f"is not divisible by grad_accum={grad_accum}"
            )
        return np.split(self.rank_batch(step), grad_accum)

    def __iter__(self) -> GlobalBatchSampler:
        return self

    def __next__(self) -> np.ndarray:
        indices = self.rank_batch(self.step)
        self.step += 1
        return indices

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "seed": self.seed,
            "num_blocks": self.num_blocks,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at state["step"]; world_size and rank are this run's own and may differ."""
        for key in ("num_blocks", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: checkpoint sampler has {key}={state[key]}, this run has "
                    f"{getattr(self, key)}; the data order would differ"
                )
        self.seed, self.step = int(state["seed"]), int(state["step"])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_blocks: int, seed: int, epoch: int) -> np.ndarray:
    # SeedSequence([seed, epoch]) gives every (seed, epoch) its own stream, identical on every rank
    # and platform, so ranks agree on the order without communicating.
    permutation = np.random.default_rng([seed, epoch]).permutation(num_blocks)
    permutation.flags.writeable = False  # cached and shared: nobody may shuffle it in place
    return permutation

"""Sources: how a corpus is found on disk and memory-mapped into one token sequence.

    load_tokens(source, *, bin_dtype="uint16", max_bytes=16 MiB, suffixes=(".txt", ".py", ".md"),
                tokenizer=None, text_key="text", eos_id=None) -> TokenStream

`source` is "stdlib", a path, a glob, or a list of them. Token sources are memory-mapped and never
read whole:
- a directory written by `gatepro-convert tokenize` (its manifest.json names the shards, dtype,
  largest token id and end-of-document id);
- flat `.bin` files of `bin_dtype` (nanoGPT's format) and `.npy` arrays, alone or in a directory;
- a Megatron indexed dataset, given by its prefix (PREFIX.bin + PREFIX.idx, read with
  megatron-core's `IndexedDataset`; a `.bin` with an `.idx` beside it is one too).
Text sources are read into memory (at most `max_bytes`) and encoded at start-up: text files (one
document each) and `.jsonl`/`.jsonl.gz` (one document per line, its `text_key` field), as bytes
(vocabulary 256) or with a local tokenizer.json. Documents are joined by a blank line, or, when
`eos_id` is given, each is followed by that id. One source holds one kind and one dtype.

Every problem raises DataError with a one-line message that names the path and the fix.
"""
from __future__ import annotations

import glob
import json
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .text import (DEFAULT_SUFFIXES, FILE_SEPARATOR, JSONL_SUFFIXES, DataError, documents, encode_text, files_under,
                   is_jsonl, load_text_tokenizer, stdlib_corpus_files, stdlib_root)

DEFAULT_MAX_BYTES = 16 << 20
BIN_DTYPES = ("uint8", "uint16", "uint32")
NPY_DTYPES = ("uint8", "uint16", "uint32", "int32", "int64")
SHARD_SUFFIXES = (".bin", ".npy")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gatepro-tokens"
# Token sources up to this many tokens have their largest id checked at start-up (a fraction of a
# second); a larger one without a manifest is checked batch by batch instead, so that start-up and
# host memory do not grow with the corpus.
FULL_SCAN_TOKENS = 1 << 27


class TokenStream:
    """One logical 1-D token sequence made of one or more arrays (byte buffers or memmaps).

    Memmapped parts stay on disk; only the slices asked for are copied into memory.
    ``eos_id`` is the end-of-document token when the source has one; ``known_max_token`` is the
    largest id when a manifest or the encoder already knows it (no scan needed).
    """

    def __init__(self, parts: Sequence[np.ndarray], description: str, byte_level: bool,
                 eos_id: int | None = None, known_max_token: int | None = None):
        self.parts = tuple(parts)
        self.description = description
        self.byte_level = byte_level
        self.eos_id = eos_id
        lengths = [len(part) for part in self.parts]
        self.part_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._max_token = known_max_token

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
        """Largest token id: known from the manifest or encoder, else read in chunks (a full pass)."""
        if self._max_token is None:
            chunk = 16 << 20
            chunk_maxima = (
                int(part[i : i + chunk].max()) for part in self.parts for i in range(0, len(part), chunk)
            )
            self._max_token = max(chunk_maxima, default=0)
        return self._max_token

    def max_token_if_cheap(self) -> int | None:
        """The largest id when it is known or the stream is small enough to scan; else None."""
        if self._max_token is None and len(self) > FULL_SCAN_TOKENS:
            return None
        return self.max_token()


# ---------------------------------------------------------------------------- finding files


def _describe_paths(paths: Sequence[Path]) -> str:
    shown = ", ".join(str(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _is_megatron_prefix(path: Path) -> bool:
    return Path(f"{path}.bin").is_file() and Path(f"{path}.idx").is_file()


def _classify_file(file: Path) -> tuple[str, Path]:
    """(kind, path) of one file: manifest, megatron (the prefix), bin, npy, jsonl or text."""
    name = str(file)
    if name.endswith((".bin", ".idx")) and _is_megatron_prefix(file.with_suffix("")):
        return "megatron", file.with_suffix("")
    if name.endswith(".bin"):
        return "bin", file
    if name.endswith(".npy"):
        return "npy", file
    return ("jsonl" if is_jsonl(file) else "text"), file


def _entries(path: Path, suffixes: Sequence[str]) -> list[tuple[str, Path]]:
    """What one path of a source names, in a fixed order."""
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return [("manifest", path)]
        if (path / "tokenize.json").is_file():
            raise DataError(f"{path} is an unfinished gatepro-convert tokenize output (no {MANIFEST}); rerun the same "
                            "command, which continues where it stopped")
        wanted = (*suffixes, *SHARD_SUFFIXES, *JSONL_SUFFIXES, ".idx")
        found = [_classify_file(path / relative) for relative in files_under(path, wanted)]
        found = [entry for entry in dict.fromkeys(found) if not str(entry[1]).endswith(".idx")]
        if not found:
            raise DataError(
                f"data directory {path} holds no files ending in {', '.join(wanted[:-1])}; add some, or pass "
                "suffixes= to accept other extensions")
        return found
    if path.is_file():
        return [_classify_file(path)]
    if _is_megatron_prefix(path):
        return [("megatron", path)]
    if glob.has_magic(str(path)):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"data source pattern {path} matches no file; check the pattern")
        return [entry for match in matches for entry in _entries(Path(match), suffixes)]
    raise DataError(
        f"data source {path} does not exist; pass an existing file, directory, glob or Megatron prefix "
        "(PREFIX.bin + PREFIX.idx), or 'stdlib' for the built-in corpus")


# ---------------------------------------------------------------------------- token sources


def _memmap_bin(file: Path, bin_dtype: str) -> np.ndarray:
    itemsize = np.dtype(bin_dtype).itemsize
    size = file.stat().st_size
    if size == 0:
        raise DataError(f"token file {file} is empty; write tokens into it or remove it from the data source")
    if size % itemsize:
        raise DataError(
            f"token file {file} has {size} bytes, not a multiple of {itemsize} for {bin_dtype}; "
            "set bin_dtype (data.bin_dtype) to the dtype it was written with")
    return np.memmap(file, dtype=bin_dtype, mode="r")


def _memmap_npy(file: Path) -> np.ndarray:
    try:
        array = np.load(file, mmap_mode="r")
    except (ValueError, OSError) as err:
        raise DataError(f"token file {file} is not a readable .npy array ({err}); rewrite it with numpy.save") from None
    if array.ndim != 1 or array.dtype.name not in NPY_DTYPES:
        raise DataError(f"token file {file} holds a {array.ndim}-D {array.dtype} array; a token shard is a 1-D "
                        f"array of {'/'.join(NPY_DTYPES)}")
    if array.size == 0:
        raise DataError(f"token file {file} is empty; write tokens into it or remove it from the data source")
    return array


def _megatron_part(prefix: Path) -> np.ndarray:
    """The tokens of a Megatron indexed dataset, memory-mapped, with dtype and length from its
    index as megatron-core's reader reads it (the .bin is the documents back to back)."""
    try:
        with warnings.catch_warnings():  # megatron.core's package import warns about optional CUDA libraries
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import IndexedDataset
    except ImportError:
        raise DataError(f"data source {prefix} is a Megatron indexed dataset (.bin + .idx), which needs "
                        "megatron-core; pip install 'gatepro_dist[megatron]'") from None
    try:
        index = IndexedDataset(str(prefix), mmap=True).index
    except Exception as err:  # a damaged index fails inside struct/numpy with assorted errors
        raise DataError(f"Megatron index {prefix}.idx cannot be read ({type(err).__name__}: {err}); "
                        "rebuild it with megatron's preprocess_data.py") from None
    count = len(index.sequence_lengths)
    tokens = int(index.sequence_pointers[-1]) // np.dtype(index.dtype).itemsize + int(index.sequence_lengths[-1]) \
        if count else 0
    if tokens == 0:
        raise DataError(f"Megatron dataset {prefix} holds no tokens; point data.source at a non-empty one")
    expected = tokens * np.dtype(index.dtype).itemsize
    if Path(f"{prefix}.bin").stat().st_size < expected:
        raise DataError(f"Megatron dataset {prefix}.bin is shorter than its index says ({expected} bytes); "
                        "it was cut off: rebuild it")
    return np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r", shape=(tokens,))


def read_manifest(directory: Path) -> dict:
    """A tokenized corpus's manifest, with every shard present at the size it declares."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read ({err}); rerun gatepro-convert tokenize into {directory}") from None
    if manifest.get("format") != MANIFEST_FORMAT or not manifest.get("complete"):
        raise DataError(f"{path} is not a finished gatepro-convert tokenize output; rerun the command, "
                        "which continues where it stopped")
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        file = directory / shard["file"]
        size = file.stat().st_size if file.is_file() else None
        if size != shard["tokens"] * itemsize:
            raise DataError(f"token shard {file} is {'missing' if size is None else f'{size} bytes'}, but the "
                            f"manifest says {shard['tokens']} {manifest['dtype']} tokens; rerun gatepro-convert "
                            "tokenize, which rewrites damaged shards")
    return manifest


def _token_stream(entries: list[tuple[str, Path]], bin_dtype: str, named: str) -> TokenStream:
    parts, dtypes, eos_ids, maxima = [], [], set(), []
    for kind, path in entries:
        if kind == "manifest":
            manifest = read_manifest(path)
            for shard in manifest["shards"]:
                parts.append(np.memmap(path / shard["file"], dtype=manifest["dtype"], mode="r"))
                dtypes.append((path / shard["file"], manifest["dtype"]))
            eos_ids.add(manifest.get("eos_id"))
            maxima.append(manifest.get("max_token_id"))
            continue
        part = {"bin": lambda p: _memmap_bin(p, bin_dtype), "npy": _memmap_npy, "megatron": _megatron_part}[kind](path)
        parts.append(part)
        dtypes.append((path, part.dtype.name))
        eos_ids.add(None)
        maxima.append(None)
    kinds = {dtype for _, dtype in dtypes}
    if len(kinds) > 1:
        (first, first_dtype), (other, other_dtype) = dtypes[0], next(d for d in dtypes if d[1] != dtypes[0][1])
        raise DataError(f"data source {named} mixes token dtypes: {first} is {first_dtype} but {other} is "
                        f"{other_dtype}; convert them to one dtype or list them as separate data.mix entries")
    eos = eos_ids.pop() if len(eos_ids) == 1 else None
    known_max = max(maxima) if all(m is not None for m in maxima) else None
    description = f"{len(parts)} {dtypes[0][1]} token file(s): {named}"
    return TokenStream(parts, description, byte_level=False, eos_id=eos, known_max_token=known_max)


# ---------------------------------------------------------------------------- text sources


def _text_stream(files: Sequence[Path], description: str, max_bytes: int, tokenizer, text_key: str,
                 eos_id: int | None) -> TokenStream:
    if eos_id is None:  # documents joined by a blank line and cut at max_bytes, as ever
        chunks, total = [], 0
        for doc in documents(files, text_key):
            total += len(doc.data) + (len(FILE_SEPARATOR) if chunks else 0)
            chunks.append(doc.data)
            if total >= max_bytes:
                break
        data = FILE_SEPARATOR.join(chunks)[:max_bytes]
        if tokenizer is None:
            return TokenStream([np.frombuffer(data, dtype=np.uint8)], description, byte_level=True)
        ids = encode_text(data, load_text_tokenizer(tokenizer))
        return TokenStream([ids], f"{description}, encoded with {tokenizer}", byte_level=False)
    # Each document followed by the end-of-document id, whole documents up to max_bytes.
    encoder = None if tokenizer is None else load_text_tokenizer(tokenizer)
    pieces, total = [], 0
    for doc in documents(files, text_key):
        ids = (np.frombuffer(doc.data, dtype=np.uint8).astype(np.uint32) if encoder is None
               else encode_text(doc.data, encoder))
        pieces += [ids, np.array([eos_id], dtype=np.uint32)]
        total += len(doc.data)
        if total >= max_bytes:
            break
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)
    how = "bytes" if tokenizer is None else f"encoded with {tokenizer}"
    known = int(ids.max()) if ids.size else None
    return TokenStream([ids], f"{description}, {how}, documents ended by {eos_id}", byte_level=False,
                       eos_id=eos_id, known_max_token=known)


def load_tokens(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    bin_dtype: str = "uint16",
    max_bytes: int = DEFAULT_MAX_BYTES,
    suffixes: Sequence[str] = DEFAULT_SUFFIXES,
    tokenizer: str | os.PathLike | None = None,
    text_key: str = "text",
    eos_id: int | None = None,
) -> TokenStream:
    """The tokens named by `source`; see the module docstring for what a source may be."""
    if bin_dtype not in BIN_DTYPES:
        raise DataError(f"bin_dtype {bin_dtype!r} is not supported; use one of {', '.join(BIN_DTYPES)}")
    if max_bytes < 1:
        raise DataError(f"max_bytes={max_bytes} leaves no data; pass a positive byte budget")
    if isinstance(source, str) and source == "stdlib":
        root = stdlib_root()
        files = [root / rel for rel in stdlib_corpus_files(root)]
        description = f"stdlib corpus of Python {sysconfig.get_python_version()} ({root})"
        return _text_stream(files, description, max_bytes, tokenizer, text_key, eos_id)

    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise DataError("data source is an empty list; name at least one file or directory, or 'stdlib'")
    entries = [entry for path in paths for entry in _entries(path, suffixes)]
    named = _describe_paths(paths)
    is_text = [kind in ("text", "jsonl") for kind, _ in entries]
    if any(is_text) and not all(is_text):
        text_file = entries[is_text.index(True)][1]
        raise DataError(f"data source {named} mixes token files with text files ({text_file}); their "
                        "vocabularies differ, so use one kind per source (or separate data.mix entries)")
    if all(is_text):
        files = [path for _, path in entries]
        stream = _text_stream(files, f"{len(files)} text file(s): {named}", max_bytes, tokenizer, text_key, eos_id)
    else:
        stream = _token_stream(entries, bin_dtype, named)
        if eos_id is not None:
            stream.eos_id = eos_id
    if len(stream) == 0:
        raise DataError(f"data source {named} contains no bytes; point it at non-empty files")
    return stream

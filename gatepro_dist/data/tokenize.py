"""The offline tokenizer behind `gatepro-convert tokenize`: a corpus of any size -> token shards.

    tokenize_corpus(sources, tokenizer, out, workers=1, shard_tokens=32 Mi, eos_id=None,
                    max_tokens=None, text_key="text") -> TokenizeResult

Documents (each text file whole, each line of a .jsonl/.jsonl.gz) are streamed in order, encoded in
`workers` processes (order kept; batches of at most 64 documents or 256 KiB), each followed by the end-of-document id, and cut into shards of
exactly `shard_tokens` tokens (the last one shorter): OUT/shard_00000.bin, ... (flat arrays of the
manifest's dtype). Beside each finished shard a small OUT/shard_00000.json says where its documents
end and where in the input the next shard starts, so a rerun with the same settings skips finished
shards and continues from there. At the end OUT/documents.npy (where each document ends, as global
token offsets) and OUT/manifest.json (tokens, documents, dtype, vocabulary, largest id, end-of-
document id, tokenizer hash, source files) are written; training reads the directory through the
manifest (data.source=OUT).

A budget (`max_tokens`) stops at a document boundary and the result says how much input was left out.
Host memory is one shard plus one batch of documents per worker, whatever the corpus size.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .sources import MANIFEST, MANIFEST_FORMAT, _entries
from .text import (DEFAULT_SUFFIXES, BYTES, DataError, Document, documents, open_tokenizer, stdlib_corpus_files,
                   stdlib_root, tokenizer_fingerprint)

DEFAULT_SHARD_TOKENS = 1 << 25
SETTINGS = "tokenize.json"  # what this output was made from: a rerun must match it
DOCUMENT_INDEX = "documents.npy"
# A batch of documents goes to a worker at a time: at most this many documents or bytes of text, so
# that a few very long documents still spread over the workers.
DOCUMENTS_PER_BATCH = 64
BYTES_PER_BATCH = 256 << 10


@dataclass
class TokenizeResult:
    directory: Path
    tokens: int
    documents: int
    shards: int
    skipped_shards: int  # finished by an earlier run and left as they were
    dtype: str
    vocab_size: int
    eos_id: int
    left_out: dict | None = None  # when the budget stopped the run: what was not tokenized
    seconds: float = 0.0
    input_bytes: int = 0  # bytes of document text read in this run
    manifest: dict = field(default_factory=dict)


def input_files(sources: Sequence[str]) -> list[Path]:
    """The text and JSON-lines files that `sources` name, in order ('stdlib': the built-in corpus)."""
    files: list[Path] = []
    for source in sources:
        if source == "stdlib":
            root = stdlib_root()
            files += [root / rel for rel in stdlib_corpus_files(root)]
            continue
        for kind, path in _entries(Path(source), DEFAULT_SUFFIXES):
            if kind not in ("text", "jsonl"):
                raise DataError(f"{path} is already tokens ({kind}); tokenize reads text files and .jsonl(.gz)")
            files.append(path)
    if not files:
        raise DataError("tokenize got no input files; name text files, .jsonl(.gz) files, directories or 'stdlib'")
    return files


# ---------------------------------------------------------------------------- workers

_worker_tokenizer = None


def _start_worker(tokenizer: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = open_tokenizer(tokenizer)


def _encode(texts: list[bytes]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_documents(texts)


def _batches(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    batch: list[Document] = []
    held = 0
    for doc in docs:
        batch.append(doc)
        held += len(doc.data)
        if len(batch) == size or held >= BYTES_PER_BATCH:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _encoded(docs: Iterator[Document], tokenizer: str, workers: int, encoder) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, ids) in input order, encoded here (workers=1) or by a pool of processes."""
    batches = _batches(docs, DOCUMENTS_PER_BATCH)
    if workers == 1:
        for batch in batches:
            yield from zip(batch, encoder.encode_documents([d.data for d in batch]))
        return
    with multiprocessing.get_context("fork").Pool(workers, _start_worker, (tokenizer,)) as pool:
        pending = ((batch, pool.apply_async(_encode, ([d.data for d in batch],))) for batch in batches)
        window: list = []
        for item in pending:  # keep 2 batches per worker in flight, results taken in order
            window.append(item)
            if len(window) >= 2 * workers:
                batch, result = window.pop(0)
                yield from zip(batch, result.get())
        for batch, result in window:
            yield from zip(batch, result.get())


# ---------------------------------------------------------------------------- progress


class _Progress:
    """One status line on stderr: MB read, documents, tokens, MB/s (redrawn on a terminal)."""

    def __init__(self, enabled: bool, total_bytes: int):
        self.enabled, self.total = enabled, max(total_bytes, 1)
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.monotonic()

    def update(self, read: int, docs: int, tokens: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 10.0)):
            return
        self.last = now
        rate = read / 1e6 / max(now - self.start, 1e-9)
        line = (f"tokenize: {read / 1e6:,.1f} MB ({min(100.0, 100 * read / self.total):.0f}%), {docs:,} documents, "
                f"{tokens:,} tokens, {rate:.1f} MB/s")
        sys.stderr.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------------- the run


def _settings(files, tokenizer, eos_id, shard_tokens, max_tokens, text_key, dtype, vocab) -> dict:
    return {"format": MANIFEST_FORMAT, "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
            "tokenizer": str(tokenizer), "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "eos_id": eos_id,
            "shard_tokens": shard_tokens, "max_tokens": max_tokens, "text_key": text_key, "dtype": dtype,
            "vocab_size": vocab}


def _finished_shards(out: Path, dtype: str) -> list[dict]:
    """The sidecars of shards 0, 1, ... that a previous run finished (stops at the first gap)."""
    done = []
    while True:
        name = f"shard_{len(done):05d}"
        sidecar, shard = out / f"{name}.json", out / f"{name}.bin"
        if not (sidecar.is_file() and shard.is_file()):
            return done
        info = json.loads(sidecar.read_text())
        if shard.stat().st_size != info["tokens"] * np.dtype(dtype).itemsize:
            return done
        done.append(info)


def _write_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


class _ShardWriter:
    """Collects documents' ids and writes a shard (with its sidecar) every `shard_tokens` tokens."""

    def __init__(self, out: Path, dtype: str, shard_tokens: int, index: int, tokens: int, docs: int):
        self.out, self.dtype, self.shard_tokens = out, dtype, shard_tokens
        self.index, self.tokens_before, self.docs_done = index, tokens, docs
        self.pieces: list[np.ndarray] = []
        self.fill = 0
        self.doc_ends: list[int] = []
        self.written: list[dict] = []

    def add(self, doc: Document, ids: np.ndarray, skip: int = 0) -> None:
        """Append a document's ids (from its `skip`-th on); cut a shard each time one fills up."""
        ids = ids[skip:]
        consumed = skip
        while len(ids):
            take = min(len(ids), self.shard_tokens - self.fill)
            self.pieces.append(ids[:take])
            self.fill += take
            ids, consumed = ids[take:], consumed + take
            if not len(ids):
                self.docs_done += 1
                self.doc_ends.append(self.fill)
            if self.fill == self.shard_tokens:
                resume = [doc.file_index, doc.next_offset, 0] if not len(ids) else [doc.file_index, doc.offset, consumed]
                self.flush(resume)

    def flush(self, resume: list[int] | None) -> None:
        if not self.fill:
            return
        tokens = np.concatenate(self.pieces).astype(self.dtype)
        name = f"shard_{self.index:05d}"
        _write_atomically(self.out / f"{name}.bin", lambda p: tokens.tofile(p))
        self.tokens_before += self.fill
        info = {"tokens": int(self.fill), "max_token_id": int(tokens.max()), "doc_ends": self.doc_ends,
                "documents_done": self.docs_done, "tokens_done": self.tokens_before, "resume": resume}
        _write_atomically(self.out / f"{name}.json", lambda p: p.write_text(json.dumps(info)))
        self.written.append(info)
        self.index, self.pieces, self.fill, self.doc_ends = self.index + 1, [], 0, []


def tokenize_corpus(sources: Sequence[str], tokenizer: str, out: str | os.PathLike, *, workers: int = 1,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, eos_id: int | None = None,
                    max_tokens: int | None = None, text_key: str = "text", progress: bool = True) -> TokenizeResult:
    """Tokenize `sources` into shards under `out`; see the module docstring."""
    started = time.monotonic()
    if workers < 1 or shard_tokens < 1 or (max_tokens is not None and max_tokens < 1):
        raise DataError("--workers, --shard-tokens and --max-tokens must be positive")
    out = Path(out)
    files = input_files(sources)
    encoder = open_tokenizer(tokenizer)
    eos = eos_id if eos_id is not None else encoder.eos_id
    if eos is None:
        raise DataError(f"tokenizer {tokenizer} names no end-of-document token (no tokenizer_config.json eos_token, "
                        "no </s> or <|endoftext|>); pass --eos-id N")
    vocab = max(encoder.vocab_size, eos + 1)
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    settings = _settings(files, tokenizer, eos, shard_tokens, max_tokens, text_key, dtype, vocab)
    if out.exists() and not (out / SETTINGS).is_file() and any(out.iterdir()):
        raise DataError(f"--out {out} exists and is not a tokenize output; choose a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    if (out / SETTINGS).is_file():
        before = json.loads((out / SETTINGS).read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise DataError(f"--out {out} holds a tokenization with other settings ({', '.join(changed)}); rerun "
                            "with the same ones to continue it, or choose another --out")
    else:
        (out / SETTINGS).write_text(json.dumps(settings, indent=1))

    done = _finished_shards(out, dtype)
    if (out / MANIFEST).is_file() and json.loads((out / MANIFEST).read_text()).get("complete"):
        manifest = json.loads((out / MANIFEST).read_text())
        return TokenizeResult(out, manifest["tokens"], manifest["documents"], len(manifest["shards"]), len(done),
                              dtype, vocab, eos, manifest.get("left_out"), time.monotonic() - started, 0, manifest)
    last = done[-1] if done else None
    if last is not None and last["resume"] is None:
        done, last = done[:-1], done[-2] if len(done) > 1 else None  # the final, short shard: redo it
    start = last["resume"] if last else [0, 0, 0]
    writer = _ShardWriter(out, dtype, shard_tokens, len(done), last["tokens_done"] if last else 0,
                          last["documents_done"] if last else 0)
    report = _Progress(progress, sum(f.stat().st_size for f in files))
    read, left_out, first = 0, None, True
    docs = documents(files, text_key, (start[0], start[1]))
    for doc, ids in _encoded(docs, str(tokenizer), workers, encoder):
        ids = np.append(ids, np.uint32(eos))
        skip = start[2] if first else 0
        first = False
        total = writer.tokens_before + writer.fill
        if max_tokens is not None and total + len(ids) - skip > max_tokens:
            left_out = _left_out(files, doc, max_tokens, total)
            break
        writer.add(doc, ids, skip)
        read += len(doc.data)
        report.update(read, writer.docs_done, writer.tokens_before + writer.fill)
    writer.flush(None)
    report.update(read, writer.docs_done, writer.tokens_before, final=True)
    manifest = _finish(out, settings, files, left_out)
    return TokenizeResult(out, manifest["tokens"], manifest["documents"], len(manifest["shards"]), len(done), dtype,
                          vocab, eos, left_out, time.monotonic() - started, read, manifest)


def _left_out(files: list[Path], doc: Document, max_tokens: int, kept: int) -> dict:
    """What a budget left out, from sizes on disk (no more reading): the rest of this file and the next ones."""
    rest = files[doc.file_index].stat().st_size - doc.offset if not str(files[doc.file_index]).endswith(".gz") else \
        files[doc.file_index].stat().st_size
    later = files[doc.file_index + 1:]
    return {"max_tokens": max_tokens, "tokens_kept": kept, "from_file": str(files[doc.file_index]),
            "from_byte": doc.offset, "files_not_started": len(later),
            "bytes_left_out": int(rest + sum(f.stat().st_size for f in later))}


def _finish(out: Path, settings: dict, files: list[Path], left_out: dict | None) -> dict:
    """documents.npy and manifest.json from every shard's sidecar (streamed: one shard's list at a time)."""
    sidecars = [json.loads((out / f"shard_{i:05d}.json").read_text()) for i in range(_count_shards(out))]
    total_docs = sum(len(s["doc_ends"]) for s in sidecars)
    index = np.lib.format.open_memmap(out / (DOCUMENT_INDEX + ".partial.npy"), mode="w+", dtype=np.int64,
                                      shape=(total_docs,))
    position, offset = 0, 0
    for info in sidecars:
        ends = np.asarray(info["doc_ends"], dtype=np.int64) + offset
        index[position:position + len(ends)] = ends
        position, offset = position + len(ends), offset + info["tokens"]
    index.flush()
    del index
    os.replace(out / (DOCUMENT_INDEX + ".partial.npy"), out / DOCUMENT_INDEX)
    manifest = {
        "format": MANIFEST_FORMAT, "complete": True, "tokens": offset, "documents": total_docs,
        "dtype": settings["dtype"], "vocab_size": settings["vocab_size"],
        "max_token_id": max((s["max_token_id"] for s in sidecars), default=0), "eos_id": settings["eos_id"],
        "tokenizer": settings["tokenizer"], "tokenizer_sha256": settings["tokenizer_sha256"],
        "text_key": settings["text_key"], "shard_tokens": settings["shard_tokens"],
        "shards": [{"file": f"shard_{i:05d}.bin", "tokens": s["tokens"], "documents": len(s["doc_ends"])}
                   for i, s in enumerate(sidecars)],
        "document_index": DOCUMENT_INDEX, "sources": settings["sources"], "left_out": left_out,
    }
    _write_atomically(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return manifest


def _count_shards(out: Path) -> int:
    count = 0
    while (out / f"shard_{count:05d}.json").is_file():
        count += 1
    return count


def describe(result: TokenizeResult) -> list[str]:
    """The lines `gatepro-convert tokenize` prints."""
    mb = result.input_bytes / 1e6
    lines = [f"{result.tokens:,} tokens, {result.documents:,} documents (each ended by {result.eos_id}) in "
             f"{result.shards} shard(s) of {result.dtype} -> {result.directory}"
             + (f"; {result.skipped_shards} shard(s) were already done and kept" if result.skipped_shards else "")
             + (f"; {mb:,.1f} MB in {result.seconds:.1f} s ({mb / max(result.seconds, 1e-9):.1f} MB/s)" if mb else "")]
    if result.left_out:
        lo = result.left_out
        lines.append(f"budget --max-tokens={lo['max_tokens']} reached at a document boundary: left out "
                     f"{lo['bytes_left_out']:,} bytes of input, from {lo['from_file']} (byte {lo['from_byte']}) "
                     f"on, {lo['files_not_started']} file(s) not started")
    lines.append(f"train with data.source={result.directory} model.vocab_size={result.vocab_size} (or larger); "
                 "add data.document_mask=true to keep attention inside documents")
    return lines


__all__ = ["BYTES", "DEFAULT_SHARD_TOKENS", "TokenizeResult", "describe", "input_files", "tokenize_corpus"]

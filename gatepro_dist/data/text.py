"""Text before it is tokens: which files a text corpus is made of, documents read from text and
JSON-lines files (with the line they came from), and the tokenizers that turn them into ids.

Both the training-time reader (``sources.py``, small corpora encoded at start-up) and the offline
tool (``tokenize.py``) read text through this module, so a corpus means the same documents to both.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

DEFAULT_SUFFIXES = (".txt", ".py", ".md")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
FILE_SEPARATOR = b"\n\n"
# Directories left out of the stdlib corpus: third-party packages differ between machines, and the
# test suites / IDLE / lib2to3 are large, unusual code that would dominate a small corpus.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})
# How much of each text file is inspected to decide whether it is really text.
BINARY_SNIFF_BYTES = 64 << 10
BINARY_CONTROL_FRACTION = 0.30
# Control bytes that ordinary text does contain: tab, LF, FF, CR, ESC (terminal colours).
TEXT_CONTROL_BYTES = (9, 10, 12, 13, 27)
# Text is encoded in pieces of about this many characters, cut after a newline, so the Rust
# tokenizer can spread them over threads (a cut changes at most the tokens around one newline).
ENCODE_PIECE_CHARS = 1 << 16
# `--tokenizer bytes` / the byte-level corpus: ids 0..255 are bytes and 256 ends a document.
BYTES = "bytes"
BYTE_EOS_ID = 256
# Names tokenizers give their end-of-document token, tried in this order when tokenizer.json has
# no tokenizer_config.json beside it that names its "eos_token".
EOS_TOKEN_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "[SEP]")


class DataError(ValueError):
    """The user's data cannot be used; the message is one line that names the path and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def is_jsonl(path: Path | str) -> bool:
    return str(path).endswith(JSONL_SUFFIXES)


# ---------------------------------------------------------------------------- which files


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


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus_files(root: str | os.PathLike | None = None) -> list[str]:
    """The default corpus's files: every *.py under `root` (default: this Python's stdlib)."""
    root = Path(root if root is not None else stdlib_root())
    return files_under(root, (".py",), STDLIB_EXCLUDED_DIRS)


def looks_binary(head: bytes) -> bool:
    """True when more than 30% of `head` is NUL or control bytes that text does not contain."""
    if not head:
        return False
    byte_values = np.frombuffer(head, dtype=np.uint8)
    control = ((byte_values < 32) & ~np.isin(byte_values, TEXT_CONTROL_BYTES)) | (byte_values == 127)
    return control.mean() > BINARY_CONTROL_FRACTION


def read_text_file(file: Path) -> bytes:
    content = file.read_bytes()
    if looks_binary(content[:BINARY_SNIFF_BYTES]):
        raise DataError(
            f"text file {file} looks binary (over 30% control bytes); pre-tokenized data must be a .bin "
            "(uint16/uint32), .npy or Megatron .bin+.idx token file")
    return content


# ---------------------------------------------------------------------------- documents


class Document(NamedTuple):
    """One document's UTF-8 bytes, where it came from, and where the next one starts."""

    data: bytes
    file_index: int
    offset: int  # byte offset in the (decompressed) file where this document starts
    next_offset: int  # ... and just after it


def open_text(file: Path):
    return gzip.open(file, "rb") if str(file).endswith(".gz") else open(file, "rb")


def jsonl_documents(file: Path, text_key: str, offset: int = 0, file_index: int = 0) -> Iterator[Document]:
    """The `text_key` value of each line of a .jsonl(.gz) file, from byte `offset` on. Blank lines
    are skipped; a line that is not a JSON object holding a string under `text_key` is an error
    naming the file and the line."""
    with open_text(file) as fh:
        fh.seek(offset)
        position = offset
        line_number = None if offset else 0  # line numbers are known when reading from the start
        for raw in fh:
            start, position = position, position + len(raw)
            line_number = None if line_number is None else line_number + 1
            if not raw.strip():
                continue
            where = f"{file}:{line_number}" if line_number is not None else f"{file} at byte {start}"
            try:
                record = json.loads(raw)
            except ValueError as err:
                raise DataError(f"{where} is not valid JSON ({err.msg}); write one JSON object per line") from None
            text = record.get(text_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                found = ", ".join(sorted(record)[:5]) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where} has no string under the text key '{text_key}' (found: {found}); "
                                "set data.text_key (or --text-key) to the field that holds the text")
            yield Document(text.encode("utf-8"), file_index, start, position)


def documents(files: Sequence[Path], text_key: str = "text", start: tuple[int, int] = (0, 0)) -> Iterator[Document]:
    """Every document of `files` in order, from (file index, byte offset) `start`: each line of a
    .jsonl(.gz) file, each other file whole (checked to be text). An offset past 0 in a whole-file
    document means that document is done: reading resumes with the next file."""
    first_file, offset = start
    for index in range(first_file, len(files)):
        file = files[index]
        if is_jsonl(file):
            yield from jsonl_documents(file, text_key, offset if index == first_file else 0, index)
        elif not (index == first_file and offset):  # a whole-file document already done has offset > 0
            content = read_text_file(file)
            yield Document(content, index, 0, len(content))


# ---------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Bytes as ids (0..255) with 256 ending a document: the `bytes` tokenizer of the offline tool."""

    eos_id = BYTE_EOS_ID
    vocab_size = BYTE_EOS_ID + 1

    def encode_documents(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        return [np.frombuffer(t, dtype=np.uint8).astype(np.uint32) for t in texts]


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer from a local tokenizer.json (nothing is downloaded)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.tokenizer = load_text_tokenizer(path)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer_eos_id(self.path, self.tokenizer)

    def encode_documents(self, texts: Sequence[bytes]) -> list[np.ndarray]:
        decoded = [t.decode("utf-8", errors="replace") for t in texts]
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tokenizer.encode_batch(decoded, add_special_tokens=False)]


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


def open_tokenizer(name: str | os.PathLike):
    """`bytes` or a tokenizer.json path, as the offline tool takes them."""
    return ByteTokenizer() if str(name) == BYTES else HFTokenizer(name)


def tokenizer_eos_id(path: Path, tokenizer) -> int | None:
    """The end-of-document id: tokenizer_config.json's "eos_token" beside tokenizer.json, else the
    first special token with a usual EOS name; None when there is none."""
    config = path.parent / "tokenizer_config.json"
    names = list(EOS_TOKEN_NAMES)
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except ValueError:
            eos = None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos, str):
            names.insert(0, eos)
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return None


def tokenizer_fingerprint(name: str | os.PathLike) -> str:
    """sha256 of tokenizer.json (or of the word `bytes`): the manifest's tokenizer hash."""
    data = BYTES.encode() if str(name) == BYTES else Path(name).read_bytes()
    return hashlib.sha256(data).hexdigest()


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

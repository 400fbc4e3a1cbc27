"""`gatepro-convert tokenize`: every document ends with the end-of-document id, workers change
nothing but the speed, a rerun keeps the shards an earlier run finished, and a token budget stops
at a document boundary and says what it left out."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from gatepro_dist.cli.convert import main
from gatepro_dist.data import DataError, load_tokens
from gatepro_dist.data.tokenize import tokenize_corpus

EOS = 256  # the bytes tokenizer's


@pytest.fixture
def corpus(tmp_path):
    """23 documents: 20 JSON lines (text under "body", one gzipped file) and 3 text files."""
    root = tmp_path / "corpus"
    (root / "web").mkdir(parents=True)
    rng = np.random.default_rng(0)
    docs = [" ".join(f"w{int(x)}" for x in rng.integers(0, 500, size=int(n))) for n in rng.integers(5, 80, size=23)]
    (root / "web" / "a.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs[:12])))
    with gzip.open(root / "web" / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"body": d}) + "\n" for d in docs[12:20]))
    for i, d in enumerate(docs[20:]):
        (root / f"note{i}.txt").write_text(d)
    return root, docs


def tokens_of(out) -> np.ndarray:
    stream = load_tokens(out)
    return stream.slice(0, len(stream))


def test_every_document_ends_with_one_eos_and_the_index_points_at_them(corpus, tmp_path):
    root, docs = corpus
    result = tokenize_corpus([str(root)], "bytes", tmp_path / "out", shard_tokens=500, text_key="body", progress=False)
    tokens = tokens_of(tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert result.documents == manifest["documents"] == len(docs) == int((tokens == EOS).sum())
    ends = np.load(tmp_path / "out" / "documents.npy")
    assert np.array_equal(np.flatnonzero(tokens == EOS) + 1, ends)
    # files sorted (note*.txt before web/), each document's bytes then the EOS
    expected = b"".join(d.encode() + b"\xff" for d in docs[20:] + docs[:20])
    assert bytes(np.where(tokens == EOS, 255, tokens).astype(np.uint8)) == expected
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 257 and manifest["eos_id"] == EOS
    assert manifest["max_token_id"] == EOS and len(manifest["tokenizer_sha256"]) == 64
    assert all(s["tokens"] == 500 for s in manifest["shards"][:-1]) and len(manifest["sources"]) == 5


def test_workers_give_the_same_shards_with_a_real_tokenizer(corpus, tmp_path):
    from gatepro_dist.hf.tiny import tiny_tokenizer

    root, docs = corpus
    tokenizer = tmp_path / "tokenizer.json"
    tiny_tokenizer().save(str(tokenizer))
    one = tokenize_corpus([str(root)], str(tokenizer), tmp_path / "one", shard_tokens=300, text_key="body",
                          progress=False)
    two = tokenize_corpus([str(root)], str(tokenizer), tmp_path / "two", shard_tokens=300, text_key="body",
                          workers=2, progress=False)
    assert one.eos_id == 2 and one.documents == two.documents == len(docs)
    assert np.array_equal(tokens_of(tmp_path / "one"), tokens_of(tmp_path / "two"))
    assert int((tokens_of(tmp_path / "one") == 2).sum()) == len(docs)


def test_a_rerun_skips_finished_shards_and_ends_as_an_uninterrupted_run(corpus, tmp_path):
    root, _ = corpus
    args = dict(shard_tokens=200, text_key="body", progress=False)
    whole = tokenize_corpus([str(root)], "bytes", tmp_path / "whole", **args)
    assert whole.shards >= 5
    out = tmp_path / "cut"
    tokenize_corpus([str(root)], "bytes", out, **args)
    for name in ["manifest.json", "documents.npy", "shard_00003.json", "shard_00004.bin"]:  # killed while on shard 3
        (out / name).unlink()
    kept = {i: (out / f"shard_{i:05d}.bin").stat().st_mtime_ns for i in range(3)}
    again = tokenize_corpus([str(root)], "bytes", out, **args)
    assert again.skipped_shards == 3 and again.shards == whole.shards
    assert {i: (out / f"shard_{i:05d}.bin").stat().st_mtime_ns for i in range(3)} == kept
    assert np.array_equal(tokens_of(out), tokens_of(tmp_path / "whole"))
    assert np.array_equal(np.load(out / "documents.npy"), np.load(tmp_path / "whole" / "documents.npy"))
    with pytest.raises(DataError, match="other settings .*shard_tokens"):
        tokenize_corpus([str(root)], "bytes", out, shard_tokens=100, text_key="body", progress=False)


def test_a_budget_stops_at_a_document_boundary_and_says_what_it_left_out(corpus, tmp_path, capsys):
    root, docs = corpus
    full = tokenize_corpus([str(root)], "bytes", tmp_path / "full", text_key="body", progress=False)
    everything = tokens_of(tmp_path / "full")
    budget = int(np.flatnonzero(everything == EOS)[9]) + 5  # 4 tokens into the 11th document
    out = tmp_path / "budget"
    code = main(["tokenize", "--quiet", "--tokenizer", "bytes", "--text-key", "body", "--max-tokens", str(budget),
                 "--out", str(out), str(root)])
    printed = capsys.readouterr().out
    assert code == 0 and "left out" in printed and "reached at a document boundary" in printed
    kept = tokens_of(out)
    assert len(kept) == budget - 4 and kept[-1] == EOS and (kept == EOS).sum() == 10
    assert np.array_equal(kept, everything[:len(kept)])
    left_out = json.loads((out / "manifest.json").read_text())["left_out"]
    assert left_out["tokens_kept"] == len(kept) and left_out["bytes_left_out"] > 0 and full.documents == len(docs)


def test_a_json_line_without_the_text_key_is_named_with_its_line(corpus, tmp_path, capsys):
    root, _ = corpus
    assert main(["tokenize", "--quiet", "--tokenizer", "bytes", "--out", str(tmp_path / "o"), str(root / "web")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"gatepro-convert: error: {root / 'web' / 'a.jsonl'}:1 has no string under the text key 'text' (found: "
        "body, id); set data.text_key (or --text-key) to the field that holds the text")
    with pytest.raises(DataError, match="unfinished gatepro-convert tokenize output"):
        load_tokens(tmp_path / "o")

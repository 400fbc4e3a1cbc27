"""Every form a data source may take reads back token for token: directories and globs of .bin
and .npy shards, a Megatron indexed dataset written by megatron-core's own builder, JSON lines
(plain and gzipped) with a custom text key, and text with an end-of-document id after each document."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from gatepro_dist.config import load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.data import DataError, build_data, load_tokens
from gatepro_dist.train.step import load_data


def shards(rng, sizes, dtype, high=60000):
    return [rng.integers(0, high, size=n).astype(dtype) for n in sizes]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_a_directory_of_bin_shards_reads_in_sorted_order(tmp_path, dtype):
    parts = shards(np.random.default_rng(0), [1000, 7, 2500], dtype)
    for i, part in enumerate(parts):
        part.tofile(tmp_path / f"shard_{i:03d}.bin")
    stream = load_tokens(tmp_path, bin_dtype=dtype)
    assert all(isinstance(p, np.memmap) for p in stream.parts)
    assert np.array_equal(stream.slice(0, len(stream)), np.concatenate(parts).astype(np.int64))


def test_a_directory_and_a_glob_of_npy_shards(tmp_path):
    parts = shards(np.random.default_rng(1), [300, 301, 5], "uint32", high=200_000)
    for i, part in enumerate(parts):
        np.save(tmp_path / f"part{i}.npy", part)
    expected = np.concatenate(parts).astype(np.int64)
    from_dir = load_tokens(tmp_path)
    assert isinstance(from_dir.parts[0], np.memmap) and from_dir.max_token() == expected.max()
    assert np.array_equal(from_dir.slice(0, len(from_dir)), expected)
    from_glob = load_tokens(str(tmp_path / "part[01].npy"))
    assert np.array_equal(from_glob.slice(0, len(from_glob)), expected[:601])
    with pytest.raises(DataError, match="matches no file"):
        load_tokens(str(tmp_path / "nothing*.npy"))


def test_a_megatron_indexed_dataset_from_its_own_builder_reads_back_token_for_token(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "corpus_text_document"
    documents = shards(np.random.default_rng(2), [17, 1, 250, 64], "uint16")
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for doc in documents:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    expected = np.concatenate(documents).astype(np.int64)
    for named in (prefix, tmp_path / "corpus_text_document.bin", tmp_path):  # prefix, its .bin, its folder
        stream = load_tokens(named)
        assert stream.parts[0].dtype == np.uint16 and isinstance(stream.parts[0], np.memmap)
        assert np.array_equal(stream.slice(0, len(stream)), expected)


def test_jsonl_with_a_custom_text_key_plain_and_gzipped(tmp_path):
    docs = ["first document", "second, longer document", "ünïcode third"]
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n\n")  # a blank line is skipped
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(lines[2] + "\n")
    joined = "\n\n".join(docs).encode()
    stream = load_tokens(tmp_path, text_key="body")
    assert stream.byte_level and bytes(stream.slice(0, len(stream)).astype(np.uint8)) == joined
    with pytest.raises(DataError, match=r"a.jsonl:1 has no string under the text key 'text' \(found: body, id\)"):
        load_tokens(tmp_path / "a.jsonl")


def test_text_documents_end_with_the_eos_id_when_one_is_given(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"ab")
    (tmp_path / "b.txt").write_bytes(b"c")
    stream = load_tokens(tmp_path, eos_id=256)
    assert stream.slice(0, len(stream)).tolist() == [97, 98, 256, 99, 256] and stream.eos_id == 256
    with pytest.raises(DataError, match="raise model.vocab_size to at least 257"):
        build_data(tmp_path, 1, 0.5, vocab_size=256, eos_id=256)


def test_a_large_source_without_a_manifest_is_checked_batch_by_batch(tmp_path, monkeypatch):
    from gatepro_dist.data import sources

    np.tile(np.array([1, 2, 3, 4, 5, 6, 7, 300], dtype=np.uint16), 100).tofile(tmp_path / "t.bin")
    monkeypatch.setattr(sources, "FULL_SCAN_TOKENS", 10)  # "large": no scan at start-up
    train, _ = build_data(tmp_path / "t.bin", 3, 0.5, vocab_size=256)
    assert train.batch([0])[0].tolist() == [[1, 2, 3]]  # the first block's ids fit
    with pytest.raises(DataError, match="contains token id 300.*raise model.vocab_size to at least 301"):
        train.batch([1])


def test_the_config_reads_mixtures_and_held_out_sources(tmp_path):
    for name, base in (("a", 0), ("b", 100), ("v", 200)):
        np.save(tmp_path / f"{name}.npy", (np.arange(4000) % 50 + base).astype(np.uint16))
    cfg = validate(load_config(None, [
        f"data.mix=[{{source: {tmp_path}/a.npy, weight: 3}}, {{source: {tmp_path}/b.npy, weight: 1, name: bee}}]",
        f"data.val_source={tmp_path}/v.npy", "data.seq_len=15", f"train.run_dir={tmp_path}/run"]), 1)
    data = load_data(cfg)
    assert data.train.names == ["a", "bee"] and [len(v) for v in data.train.views] == [250, 250]
    assert data.val.batch([0])[0].min() >= 200  # held out: the whole of v.npy, none of a or b
    reloaded = load_config(None, [f"{k}={v}" for k, v in [("data.mix", json.dumps(cfg.to_dict()["data"]["mix"]))]])
    assert reloaded.data.mix == cfg.data.mix


def test_the_prefetching_view_serves_exactly_what_the_view_reads_and_reads_ahead(tmp_path):
    from gatepro_dist.data import GlobalBatchSampler, PrefetchingView

    np.arange(20_000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    train, _ = build_data(tmp_path / "t.bin", 15, 0.1)
    sampler = GlobalBatchSampler(len(train), 8, seed=0)
    view = PrefetchingView(train, sampler, lambda step: np.split(sampler.global_batch(step), 2))
    for step in range(5):
        for part in np.split(sampler.global_batch(step), 2):
            served = view.batch(part)
            assert all(torch.equal(a, b) for a, b in zip(served, train.batch(part)))
            assert len(view._pending) == 2  # the next two micro-batches are being read already
        sampler.step = step + 1
    odd = np.array([3, 1])  # not what the sampler would ask for: read on the spot
    assert torch.equal(view.batch(odd)[0], train.batch(odd)[0])
    view.close()

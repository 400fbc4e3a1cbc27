"""Properties of the data pipeline: sources are deterministic, bad input fails with a useful
one-line message, the split is disjoint, and the sampler's global batch ignores the world size."""

import math

import numpy as np
import pytest
import torch

from gatepro_dist.data import (
    FILE_SEPARATOR,
    DataError,
    GlobalBatchSampler,
    build_data,
    byte_unigram_entropy,
    load_tokens,
    make_batch,
    split_blocks,
    stdlib_corpus_files,
)

SMALL_STDLIB = 256 << 10  # enough bytes to exercise the stdlib path without reading all of it


# ---------------------------------------------------------------------------- sources


def test_stdlib_corpus_is_identical_across_loads():
    first, second = load_tokens("stdlib"), load_tokens("stdlib")
    assert len(first) == len(second) > 1 << 20
    assert np.array_equal(first.slice(0, 4096), second.slice(0, 4096))
    assert np.array_equal(first.slice(len(first) - 4096, len(first)), second.slice(len(second) - 4096, len(second)))
    assert first.byte_level and first.max_token() < 256


def test_stdlib_file_list_is_sorted_and_excludes_site_packages_and_tests():
    files = stdlib_corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/__init__.py" in files
    excluded = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(excluded & set(path.split("/")[:-1]) for path in files)


def test_stdlib_walk_skips_excluded_directories_at_any_depth(tmp_path):
    for relative in ["a.py", "pkg/b.py", "pkg/tests/t.py", "site-packages/numpy/x.py", "test/y.py",
                     "idlelib/z.py", "lib2to3/w.py", "pkg/notes.txt"]:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n")
    assert stdlib_corpus_files(tmp_path) == ["a.py", "pkg/b.py"]


def test_stdlib_max_bytes_caps_the_corpus_to_a_prefix():
    full, capped = load_tokens("stdlib", max_bytes=2 * SMALL_STDLIB), load_tokens("stdlib", max_bytes=SMALL_STDLIB)
    assert len(capped) == SMALL_STDLIB
    assert np.array_equal(capped.slice(0, len(capped)), full.slice(0, SMALL_STDLIB))


def test_text_directory_is_read_recursively_in_sorted_order_with_separators(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_bytes(b"second")
    (tmp_path / "a.md").write_bytes(b"first")
    (tmp_path / "c.py").write_bytes(b"third")
    (tmp_path / "skipped.csv").write_bytes(b"not a matching suffix")
    stream = load_tokens(str(tmp_path))
    expected = FILE_SEPARATOR.join([b"first", b"second", b"third"])
    assert bytes(stream.slice(0, len(stream)).astype(np.uint8)) == expected


def test_several_text_paths_keep_the_order_given(tmp_path):
    (tmp_path / "z.txt").write_bytes(b"zzz")
    (tmp_path / "a.txt").write_bytes(b"aaa")
    stream = load_tokens([tmp_path / "z.txt", tmp_path / "a.txt"])
    assert bytes(stream.slice(0, len(stream)).astype(np.uint8)) == b"zzz" + FILE_SEPARATOR + b"aaa"


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32"])
def test_bin_memmap_round_trips_exactly(tmp_path, dtype):
    tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, size=5000, dtype=np.int64)
    tokens.astype(dtype).tofile(tmp_path / "tokens.bin")
    stream = load_tokens(tmp_path / "tokens.bin", bin_dtype=dtype)
    assert isinstance(stream.parts[0], np.memmap)  # stays on disk
    assert np.array_equal(stream.slice(0, len(stream)), tokens)
    assert stream.max_token() == tokens.max() and not stream.byte_level


def test_several_bin_files_concatenate_and_slices_cross_file_boundaries(tmp_path):
    chunks = [np.arange(start, start + n, dtype=np.uint16) for start, n in [(0, 7), (1000, 3), (60000, 11)]]
    for i, chunk in enumerate(chunks):
        chunk.tofile(tmp_path / f"part{i}.bin")
    stream = load_tokens([tmp_path / f"part{i}.bin" for i in range(3)])
    everything = np.concatenate(chunks).astype(np.int64)
    assert len(stream) == 21
    for start, stop in [(0, 21), (5, 9), (6, 12), (7, 10), (3, 3), (20, 21)]:
        assert np.array_equal(stream.slice(start, stop), everything[start:stop])


# ---------------------------------------------------------------------------- bad input


def assert_one_line_error_naming(path, call):
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert str(path) in message and "\n" not in message, message
    return message


def test_missing_path_is_a_data_error_naming_it(tmp_path):
    assert_one_line_error_naming(tmp_path / "nope.txt", lambda: load_tokens(tmp_path / "nope.txt"))


def test_empty_file_and_directory_without_matches_are_data_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert_one_line_error_naming(tmp_path / "empty.txt", lambda: load_tokens(tmp_path / "empty.txt"))
    (tmp_path / "empty.bin").write_bytes(b"")
    assert_one_line_error_naming(tmp_path / "empty.bin", lambda: load_tokens(tmp_path / "empty.bin"))
    (tmp_path / "only_csv").mkdir()
    (tmp_path / "only_csv" / "x.csv").write_text("1,2")
    assert_one_line_error_naming(tmp_path / "only_csv", lambda: load_tokens(tmp_path / "only_csv"))


def test_binary_garbage_passed_as_text_suggests_bin(tmp_path):
    garbage = tmp_path / "weights.txt"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 32, size=4096, dtype=np.uint8).tobytes())
    message = assert_one_line_error_naming(garbage, lambda: load_tokens(garbage))
    assert "binary" in message and ".bin" in message


def test_text_with_tabs_and_newlines_is_not_mistaken_for_binary(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"\t\n\r\n" * 1000 + b"x")
    assert len(load_tokens(tmp_path / "t.txt")) == 4001


def test_bin_size_not_a_multiple_of_the_dtype_names_bin_dtype(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x02\x03")
    message = assert_one_line_error_naming(tmp_path / "odd.bin", lambda: load_tokens(tmp_path / "odd.bin"))
    assert "bin_dtype" in message


def test_corpus_too_short_for_train_and_val_block_names_seq_len(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"x" * 17)
    message = assert_one_line_error_naming(tmp_path / "short.txt", lambda: build_data(tmp_path / "short.txt", 8))
    assert "seq_len" in message
    train, val = build_data(tmp_path / "short.txt", 7)  # 17 bytes do hold two blocks of 7 + 1
    assert (len(train), len(val)) == (1, 1)


def test_tokens_outside_the_vocab_are_rejected(tmp_path):
    np.array([1, 2, 3, 500] * 10, dtype=np.uint16).tofile(tmp_path / "t.bin")
    path = tmp_path / "t.bin"
    message = assert_one_line_error_naming(path, lambda: build_data(path, 3, vocab_size=256))
    assert "501" in message


def test_mixing_text_and_bin_files_is_rejected(tmp_path):
    np.zeros(4, dtype=np.uint16).tofile(tmp_path / "t.bin")
    (tmp_path / "t.txt").write_text("hello")
    assert_one_line_error_naming(tmp_path / "t.bin", lambda: load_tokens([tmp_path / "t.bin", tmp_path / "t.txt"]))


# ---------------------------------------------------------------------------- split and batches


@pytest.mark.parametrize("val_fraction", [0.01, 0.1, 0.25])
def test_split_is_a_disjoint_cover_with_the_tail_for_validation(tmp_path, val_fraction):
    np.arange(10_000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    train, val = build_data(tmp_path / "t.bin", seq_len=15, val_fraction=val_fraction)
    num_blocks = 10_000 // 16
    assert len(train) + len(val) == num_blocks
    assert len(val) == max(1, round(num_blocks * val_fraction))
    assert train.token_range[1] == val.token_range[0]  # adjacent, no shared token
    first_val_input, _ = val.batch([0])
    assert first_val_input[0, 0].item() == train.token_range[1]  # token id == position in this corpus


def test_split_keeps_at_least_one_block_on_each_side():
    assert split_blocks(2, 0.9) == (1, 1)
    assert split_blocks(1000, 0.0001) == (999, 1)


def test_make_batch_targets_are_inputs_shifted_by_one(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 65535, size=1000).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    stream = load_tokens(tmp_path / "t.bin")
    inputs, targets = make_batch(stream, [3, 0, 7], seq_len=9)
    assert inputs.dtype == targets.dtype == torch.long and inputs.shape == (3, 9)
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert torch.equal(inputs[0], torch.from_numpy(tokens[30:39].astype(np.int64)))
    assert targets[0, -1].item() == tokens[39]


def test_in_order_batches_visit_every_validation_block_once(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    _, val = build_data(tmp_path / "t.bin", seq_len=9, val_fraction=0.3)
    firsts = torch.cat([inputs[:, 0] for inputs, _ in val.in_order_batches(batch_size=4)])
    assert firsts.tolist() == list(range(val.token_range[0], val.token_range[1], 10))


def test_unigram_entropy_is_in_nats(tmp_path):
    np.tile(np.arange(256, dtype=np.uint8), 40).tofile(tmp_path / "uniform.bin")
    uniform = load_tokens(tmp_path / "uniform.bin", bin_dtype="uint8")
    assert byte_unigram_entropy(uniform) == pytest.approx(math.log(256))
    (tmp_path / "ab.txt").write_bytes(b"ab" * 500)
    assert byte_unigram_entropy(load_tokens(tmp_path / "ab.txt")) == pytest.approx(math.log(2))
    (tmp_path / "a.txt").write_bytes(b"a" * 500)
    assert byte_unigram_entropy(load_tokens(tmp_path / "a.txt")) == 0.0


# ---------------------------------------------------------------------------- sampler


def global_batch_from_ranks(world_size, step, num_blocks=37, global_batch_size=8, seed=3):
    ranks = [GlobalBatchSampler(num_blocks, global_batch_size, world_size, rank, seed) for rank in range(world_size)]
    return [sampler.rank_batch(step) for sampler in ranks]


def test_rank_slices_are_disjoint_and_union_to_the_global_batch():
    # 64 blocks / 8 per step: no batch straddles an epoch boundary, so all 8 blocks are distinct
    # (a straddling batch may legitimately hold one block from each of two epochs).
    for step in range(16):
        slices = global_batch_from_ranks(4, step, num_blocks=64)
        assert all(len(s) == 2 for s in slices)
        union = np.concatenate(slices)
        assert len(set(union.tolist())) == 8
        assert np.array_equal(union, GlobalBatchSampler(64, 8, 4, 0, seed=3).global_batch(step))


def test_global_batch_does_not_depend_on_world_size():
    for step in range(20):  # 20 steps of 8 over 37 blocks crosses four epoch boundaries
        single = global_batch_from_ranks(1, step)[0]
        for world_size in (2, 4):
            assert np.array_equal(np.concatenate(global_batch_from_ranks(world_size, step)), single)


def test_two_constructions_give_the_same_sequence_and_seeds_differ():
    first, second = GlobalBatchSampler(100, 10, seed=5), GlobalBatchSampler(100, 10, seed=5)
    assert all(np.array_equal(next(first), next(second)) for _ in range(25))
    other_seed = GlobalBatchSampler(100, 10, seed=6)
    assert not np.array_equal(other_seed.global_batch(0), GlobalBatchSampler(100, 10, seed=5).global_batch(0))


def test_each_epoch_is_a_fresh_permutation_and_batches_wrap_across_epochs():
    sampler = GlobalBatchSampler(10, 4, seed=0)
    stream = np.concatenate([sampler.global_batch(step) for step in range(5)])  # 20 positions = 2 epochs
    epoch0, epoch1 = stream[:10], stream[10:]
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(10))
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(sampler.global_batch(2), np.concatenate([epoch0[8:], epoch1[:2]]))
    assert sampler.epoch_of(2) == 0 and sampler.epoch_of(3) == 1


def test_resume_at_a_different_world_size_continues_with_the_next_global_batches():
    uninterrupted = GlobalBatchSampler(37, 8, seed=3)
    expected = [next(uninterrupted) for _ in range(15)][6:]

    before = [GlobalBatchSampler(37, 8, world_size=2, rank=r, seed=3) for r in range(2)]
    for _ in range(6):
        for sampler in before:
            next(sampler)
    state = before[0].state_dict()

    after = [GlobalBatchSampler(37, 8, world_size=4, rank=r, seed=0) for r in range(4)]
    for sampler in after:
        sampler.load_state_dict(state)  # restores seed=3 too
    resumed = [np.concatenate([next(sampler) for sampler in after]) for _ in range(9)]
    assert all(np.array_equal(a, b) for a, b in zip(resumed, expected))


def test_resume_with_a_different_global_batch_size_is_refused():
    state = GlobalBatchSampler(37, 8).state_dict()
    with pytest.raises(ValueError, match="global_batch_size"):
        GlobalBatchSampler(37, 16).load_state_dict(state)


def test_micro_batches_split_this_ranks_slice_in_order():
    sampler = GlobalBatchSampler(64, 16, world_size=2, rank=1, seed=0)
    micro = sampler.micro_batches(step=3, grad_accum=4)
    assert [len(m) for m in micro] == [2, 2, 2, 2]
    assert np.array_equal(np.concatenate(micro), sampler.rank_batch(3))
    with pytest.raises(ValueError, match="grad_accum"):
        sampler.micro_batches(step=3, grad_accum=3)


def test_sampler_rejects_a_global_batch_that_world_size_does_not_divide():
    with pytest.raises(ValueError, match="world_size"):
        GlobalBatchSampler(64, 6, world_size=4, rank=0)

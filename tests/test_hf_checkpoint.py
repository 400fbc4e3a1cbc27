"""Weights-only checkpoints (what an import writes): weights load at any layout, the optimizer and
the step start fresh, and a later full checkpoint takes over `resume=auto`."""
from __future__ import annotations

import json

import pytest
import torch

from gatepro_dist.train.checkpoint import (CheckpointError, check_compatible, latest_checkpoint, read_manifest,
                                     read_model_tensors, save_weights_only)
from gatepro_dist.config import config_hash
from gatepro_dist.train.model import Transformer
from test_trainer import assert_close_lists, run_training, tiny_config

STEPS = ["train.steps=3", "train.save_every=3"]


def write_init_as_weights_only(run_dir, *overrides):
    """A weights-only checkpoint holding exactly the weights a fresh run initialises."""
    cfg = tiny_config(run_dir, *overrides)
    save_weights_only(run_dir, Transformer(cfg).state_dict(), cfg.to_dict(), config_hash(cfg),
                      source={"test": "init"})
    return latest_checkpoint(run_dir)


def test_weights_only_checkpoint_of_the_init_reproduces_a_fresh_run(tmp_path):
    """Same weights + fresh AdamW + step 0 + sampler at 0 == a run from scratch, bit for bit."""
    fresh = run_training(1, tmp_path / "fresh", *STEPS)
    checkpoint = write_init_as_weights_only(tmp_path / "from-weights")
    manifest = read_manifest(checkpoint)
    assert (checkpoint.name, manifest["kind"], manifest["step"]) == ("step_00000000", "weights-only", 0)
    assert not (checkpoint / "trainer_state.json").exists()
    resumed = run_training(1, tmp_path / "from-weights", *STEPS, "train.resume=auto")
    assert resumed == fresh
    records = [json.loads(line) for line in (tmp_path / "from-weights" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


def test_weights_only_checkpoint_loads_at_ep2_and_its_successor_reads_back_as_global_tensors(tmp_path):
    fresh = run_training(1, tmp_path / "fresh", *STEPS)
    checkpoint = write_init_as_weights_only(tmp_path / "weights")
    at_ep2 = run_training(2, tmp_path / "ep2", *STEPS, "parallel.ep=2", f"train.resume={checkpoint}")
    assert_close_lists(at_ep2, fresh)

    saved_at_ep2 = latest_checkpoint(tmp_path / "ep2")
    assert read_manifest(saved_at_ep2)["ep"] == 2
    tensors = read_model_tensors(saved_at_ep2)  # what exporters read: no model, one process
    init = Transformer(tiny_config(tmp_path / "ep2")).state_dict()
    assert sorted(tensors) == sorted(init)
    for name, tensor in init.items():
        assert tensors[name].shape == tensor.shape, name  # e.g. experts [8, D, 2F], not one rank's [4, ...]
    assert not torch.equal(tensors["layers.0.ffn.experts.gate_up_proj"], init["layers.0.ffn.experts.gate_up_proj"])


def test_resume_auto_moves_on_to_the_first_full_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    write_init_as_weights_only(run_dir)
    first = run_training(1, run_dir, "train.steps=5", "train.save_every=3", "train.resume=auto")
    assert latest_checkpoint(run_dir).name == "step_00000005"
    (run_dir / "checkpoints" / "latest").write_text("step_00000003")
    again = run_training(1, run_dir, "train.steps=5", "train.save_every=3", "train.resume=auto")
    assert again == first[3:], "a full checkpoint resumes its optimizer and step, bit for bit"


def test_a_checkpoint_from_before_a_schema_key_existed_still_resumes(tmp_path):
    cfg = tiny_config(tmp_path)
    old = cfg.to_dict()
    del old["model"]["qk_norm_scope"], old["model"]["dense_layers"], old["data"]["tokenizer"]
    assert check_compatible({"config": old}, cfg.to_dict(), tmp_path) == []
    old["model"]["d_model"] = 64
    with pytest.raises(CheckpointError, match="model.d_model"):
        check_compatible({"config": old}, cfg.to_dict(), tmp_path)

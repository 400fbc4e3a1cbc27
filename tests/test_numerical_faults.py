"""A NaN or Inf in a step triggers train.nan_policy (skip the step, or save and stop), and the log
names the step and the layer where it first appeared. The faults are injected with
GATEPRO_FAULT (gatepro_dist/cluster/faults.py) into the real model; everything else is the real trainer."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gatepro_dist.cluster import faults
from gatepro_dist.train.checkpoint import latest_checkpoint, read_model_tensors
from gatepro_dist.train.parallel import single_process_groups
from gatepro_dist.cluster.preemption import EXIT_FAILED, NonFiniteStop
from gatepro_dist.train.engine import train
from launch_helpers import losses, steps_done
from test_launch_faults import finish, start_ranks
from test_trainer import tiny_config


@pytest.fixture
def fault():
    yield faults.install
    faults.install(None)


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_one_process(run, *overrides):
    said = []
    result = train(tiny_config(run, *overrides), single_process_groups(), log=said.append)
    return result, said


def test_nan_activation_with_skip_policy_skips_only_that_step_and_names_the_layer(tmp_path, fault):
    fault("nan:layer=1,step=3")
    run = tmp_path / "run"
    _, said = train_one_process(run, "train.steps=5", "train.save_every=1")
    recs = records(run)
    assert [r.get("skipped", False) for r in recs] == [False, False, True, False, False]
    assert recs[2]["non_finite"] == {"what": "activation", "layer": 1, "where": "the output of layer 1 (MoE)"}
    assert math.isnan(recs[2]["loss"]) and all(math.isfinite(r["loss"]) for r in recs[:2] + recs[3:])
    assert said.count("non-finite activation at step 3, first in the output of layer 1 (MoE): step skipped "
                      "(train.nan_policy=skip)") == 1
    # Skipped means skipped: the weights after step 3 are those after step 2.
    after_2, after_3, after_4 = (read_model_tensors(run / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4))
    assert all(torch.equal(after_2[k], after_3[k]) for k in after_2)
    assert not all(torch.equal(after_3[k], after_4[k]) for k in after_3)


def test_inf_gradient_is_located_at_the_first_parameter_of_the_layer(tmp_path, fault):
    fault("inf_grad:layer=1,step=2")
    run = tmp_path / "run"
    _, said = train_one_process(run, "train.steps=3")
    recs = records(run)
    assert [r.get("skipped", False) for r in recs] == [False, True, False]
    assert math.isfinite(recs[1]["loss"]) and math.isinf(recs[1]["grad_norm"])
    assert recs[1]["non_finite"] == {"what": "gradient", "layer": 1,
                                     "where": "the gradient of layers.1.attn_norm.weight"}
    assert any(line.startswith("non-finite gradient at step 2, first in the gradient of layers.1.") for line in said)


def test_stop_policy_saves_then_raises_with_the_step_and_layer(tmp_path, fault):
    fault("nan:layer=0,step=2")
    run = tmp_path / "run"
    with pytest.raises(NonFiniteStop) as err:
        train_one_process(run, "train.steps=5", "train.nan_policy=stop")
    assert str(err.value) == (
        f"non-finite activation at step 2, first in the output of layer 0 (MoE); checkpoint "
        f"{run}/checkpoints/step_00000002 saved (without this step's update); lower train.lr or raise "
        "train.grad_clip/warmup, then resume with train.resume=auto")
    assert latest_checkpoint(run).name == "step_00000002" and steps_done(run) == 2


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_one_message_and_the_run_resumes(tmp_path):
    """Only rank 1's activations go bad; both ranks agree, save step 3 together and exit 1."""
    run = tmp_path / "run"
    procs = start_ranks(run, "train.steps=5", "train.nan_policy=stop",
                        env_extra={"GATEPRO_FAULT": "nan:layer=1,step=3,rank=1,value=inf"})
    results = [finish(p, timeout=120) for p in procs]
    assert [r[0] for r in results] == [EXIT_FAILED] * 2, [r[2][-2000:] for r in results]
    lines = [line for line in results[0][2].splitlines() if line.startswith("gatepro-train: error:")]
    assert lines == [
        f"gatepro-train: error: non-finite activation at step 3, first in the output of layer 1 (MoE); checkpoint "
        f"{run}/checkpoints/step_00000003 saved (without this step's update); lower train.lr or raise "
        "train.grad_clip/warmup, then resume with train.resume=auto"]
    assert "gatepro-train: error:" not in results[1][2] and "Traceback" not in results[0][2] + results[1][2]
    assert records(run)[-1]["non_finite"]["layer"] == 1

    procs = start_ranks(run, "train.steps=5", "train.resume=auto")
    assert [finish(p, timeout=120)[0] for p in procs] == [0, 0]
    assert steps_done(run) == 5 and all(math.isfinite(x) for x in losses(run)[3:])

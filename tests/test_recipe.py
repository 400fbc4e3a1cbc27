"""The training recipe people size jobs with: lr schedules, what a resume with a changed horizon does,
the per-step numbers on every metrics line, ``train.log_every``, checkpoint retention and the FLOPs
formula behind MFU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from gatepro_dist.config import load_config
from gatepro_dist.train.checkpoint import CheckpointError, check_compatible, latest_checkpoint, read_manifest
from gatepro_dist.train.optim import lr_at, schedule_change_problem
from gatepro_dist.train.step_numbers import PHASES, flops_per_token
from test_trainer import run_training, tiny_config

WSD = ["train.lr_schedule=wsd", "train.decay_fraction=0.25", "train.warmup_steps=2", "train.lr=1e-3",
       "train.min_lr_ratio=0.1"]


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def wsd_runs(tmp_path_factory):
    """20 WSD steps logged every step (checkpoints every 5, the last 2 kept), and the same run
    logged every 5 steps."""
    root = tmp_path_factory.mktemp("wsd")
    common = ["train.steps=20", *WSD, "train.eval_every=10", "train.stats_every=5"]
    every = run_training(1, root / "every", *common, "train.save_every=5", "train.keep_last=2")
    run_training(1, root / "fifth", *common, "train.save_every=1000", "train.log_every=5")
    return root, every


def test_a_wsd_run_is_flat_after_warmup_and_decays_over_its_last_quarter(wsd_runs):
    root, _ = wsd_runs
    lr = {line["step"]: line["lr"] for line in lines(root / "every")}
    assert sorted(lr) == list(range(1, 21))
    assert lr[1] == pytest.approx(0.5e-3) and lr[2] == pytest.approx(1e-3)  # warmup
    assert {lr[s] for s in range(3, 16)} == {1e-3}  # stable, exactly the peak
    decay = [lr[s] for s in range(15, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # steps 16..20 decay ...
    assert lr[20] == pytest.approx(1e-4)  # ... to min_lr_ratio * lr at the last step


def test_every_line_carries_mfu_tflops_memory_and_the_time_split(wsd_runs):
    root, _ = wsd_runs
    for line in lines(root / "every"):
        assert line["mfu"] is None  # the CPU has no known peak and train.peak_tflops is unset
        assert line["tflops_per_rank"] > 0 and line["max_mem_gib"] > 0.05
        assert all(line[phase] >= 0 for phase in PHASES)
        assert line["fwd_bwd_s"] > 0 and sum(line[p] for p in PHASES) <= 1 / line["tokens_per_s"] * 8 * 32 * 1.01
        # TFLOP/s = FLOPs per token x tokens/s (one rank)
        assert line["tflops_per_rank"] == pytest.approx(flops_per_token(tiny_config("/x")) * line["tokens_per_s"] / 1e12)


def test_log_every_5_over_20_steps_writes_4_lines_that_sum_their_steps(wsd_runs):
    root, _ = wsd_runs
    every, fifth = lines(root / "every"), lines(root / "fifth")
    assert [line["step"] for line in fifth] == [5, 10, 15, 20]
    assert all(line["steps_in_line"] == 5 for line in fifth)
    for line in fifth:
        window = [e for e in every if line["step"] - 5 < e["step"] <= line["step"]]
        assert line["loss"] == pytest.approx(sum(e["loss"] for e in window) / 5, rel=1e-12)
        assert line["lr"] == window[-1]["lr"]
        for layer, entry in enumerate(line["moe"]):
            counts = [sum(e["moe"][layer]["tokens_per_expert"][i] for e in window)
                      for i in range(len(entry["tokens_per_expert"]))]
            assert entry["tokens_per_expert"] == counts and sum(counts) == 5 * 8 * 32 * 2  # 5 steps of top-2
            assert entry["zero_token_experts"] == sum(c == 0 for c in counts)
    assert fifth[1]["val_loss"] == every[9]["val_loss"] and "similarity" in fifth[0]["moe"][0]


def test_keep_last_2_leaves_the_two_newest_checkpoints(wsd_runs):
    root, _ = wsd_runs
    names = sorted(p.name for p in (root / "every" / "checkpoints").iterdir())
    assert names == ["latest", "step_00000015", "step_00000020"]


def test_a_resumed_wsd_run_may_extend_its_stable_phase(wsd_runs):
    root, every = wsd_runs
    step_15 = root / "every" / "checkpoints" / "step_00000015"
    # Steps 1..15 took the same lrs under a 40-step horizon (decay from step 31): accepted.
    extended = tiny_config(root / "x", "train.steps=40", *WSD).to_dict()
    check_compatible(read_manifest(step_15), extended, step_15)
    # At 16 steps the decay would have begun at step 13, under steps already taken: refused.
    shorter = tiny_config(root / "x", "train.steps=16", *WSD).to_dict()
    with pytest.raises(CheckpointError, match="train.steps changed from 20 to 16"):
        check_compatible(read_manifest(step_15), shorter, step_15)
    losses = run_training(1, root / "every", "train.steps=24", *WSD, "train.eval_every=10", "train.save_every=5",
                          "train.keep_last=2", f"train.resume={step_15}")
    assert len(losses) == 9 and all(math.isfinite(x) for x in losses)
    assert losses[:1] == every[15:16]  # step 16: still the stable lr under both horizons
    resumed = {line["step"]: line["lr"] for line in lines(root / "every")}
    assert resumed[16] == resumed[18] == 1e-3 and resumed[24] == pytest.approx(1e-4)


def test_a_cosine_run_refuses_a_changed_horizon_unless_allowed(tmp_path):
    t = load_config(None, ["train.steps=100", "train.warmup_steps=10"]).train
    longer = load_config(None, ["train.steps=200", "train.warmup_steps=10"]).train
    assert schedule_change_problem(t, longer, steps_done=5) is None  # still in warmup: nothing changed
    problem = schedule_change_problem(t, longer, steps_done=50)
    assert "first: step 12" in problem and "train.allow_schedule_change=true" in problem
    allowed = load_config(None, ["train.steps=200", "train.warmup_steps=10", "train.allow_schedule_change=true"]).train
    assert schedule_change_problem(t, allowed, steps_done=50) is None
    constant = [load_config(None, [f"train.steps={n}", "train.lr_schedule=constant"]).train for n in (100, 200)]
    assert schedule_change_problem(*constant, steps_done=90) is None


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd", "constant"])
def test_every_schedule_warms_up_then_ends_where_it_says(schedule):
    lrs = [lr_at(s, peak=1.0, warmup=5, total=100, min_ratio=0.1, schedule=schedule, decay_fraction=0.2)
           for s in range(100)]
    assert lrs[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # never rises after warmup
    end = {"constant": 1.0, "wsd": 0.1, "linear": None, "cosine": None}[schedule]
    if end is not None:
        assert lrs[-1] == pytest.approx(end)
    else:  # cosine and linear reach the floor at ``total`` itself, one step after the last
        assert 0.1 < lrs[-1] < 0.1 + 1e-2


def test_wsd_one_minus_sqrt_decays_faster_early_than_linear():
    linear = [lr_at(s, peak=1.0, warmup=0, total=10, min_ratio=0.0, schedule="wsd", decay_fraction=0.5) for s in range(10)]
    sqrt = [lr_at(s, peak=1.0, warmup=0, total=10, min_ratio=0.0, schedule="wsd", decay_fraction=0.5,
                  decay_shape="1-sqrt") for s in range(10)]
    assert linear[:5] == sqrt[:5] == [1.0] * 5
    assert linear[5:] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert sqrt[5:] == pytest.approx([1 - math.sqrt(p) for p in (0.2, 0.4, 0.6, 0.8, 1.0)])


@pytest.mark.parametrize("extra", [[], ["model.n_layers=3", "model.first_dense_layers=1", "moe.num_shared_experts=1"]])
def test_the_flops_per_token_formula_equals_torchs_flop_counter(extra):
    """``flops_per_token`` (6 x matmul parameters per token + the attention square) against
    ``torch.utils.flop_counter`` over a real forward and backward. The counter has no formula for
    ``grouped_mm`` nor for the CPU flash-attention kernel, so the experts run as their loop and
    attention in its math form (same FLOPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from gatepro_dist.train.model import Transformer

    cfg = tiny_config("/x", "moe.grouped_gemm=false", "model.vocab_size=512", *extra)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, cfg.data.seq_len))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits, stats = model(tokens)
        (logits.float().square().mean() + sum(s.loss for s in stats)).backward()
    counted = counter.get_total_flops() / tokens.numel()
    assert counted == pytest.approx(flops_per_token(cfg), rel=0.02)


def test_adamw_takes_its_eps_from_the_config():
    from gatepro_dist.train.numerics import adamw

    t = load_config(None, ["train.eps=1e-6"]).train
    optimizer = adamw([torch.nn.Parameter(torch.zeros(2))], t, torch.device("cpu"))
    assert optimizer.param_groups[0]["eps"] == 1e-6 and optimizer.param_groups[0]["foreach"]


def test_latest_is_never_pruned(tmp_path):
    run_training(1, tmp_path / "run", "train.steps=3", "train.save_every=1", "train.keep_last=1")
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_00000003"]


KILL_BEFORE_PUBLISHING_STEP_4 = """
import os, signal, sys
from gatepro_dist.train import async_checkpoint
real_finish = async_checkpoint.AsyncCheckpointer.finish
def finish_or_die(self):
    if self.in_flight is not None and self.in_flight.final.name == "step_00000004":
        os.kill(os.getpid(), signal.SIGKILL)  # step 4's save was in flight while steps 5 and 6 ran
    return real_finish(self)
async_checkpoint.AsyncCheckpointer.finish = finish_or_die
from gatepro_dist.cli.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_async_save_runs_behind_training_and_a_kill_keeps_the_previous_checkpoint(tmp_path):
    """train.async_save: the step-4 checkpoint is still unpublished when steps 5 and 6 have run
    (their metrics lines are written); SIGKILL then leaves step 4 as a ``.partial`` directory,
    ``latest`` at step 2, and a resume continues bit for bit as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys

    from test_trainer import TINY

    run_dir = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run_dir}", "train.steps=8", "train.save_every=2", "train.async_save=true"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_PUBLISHING_STEP_4, *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [line["step"] for line in lines(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert (run_dir / "checkpoints" / "step_00000004.partial").is_dir()
    assert not (run_dir / "checkpoints" / "step_00000004").exists()

    resumed = run_training(1, run_dir, "train.steps=8", "train.save_every=2", "train.async_save=true",
                           "train.resume=auto")
    uninterrupted = run_training(1, tmp_path / "uninterrupted", "train.steps=8", "train.save_every=2")
    assert resumed == uninterrupted[2:]
    assert latest_checkpoint(run_dir).name == "step_00000008"
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.suffix != ".partial") == [
        "step_00000002", "step_00000004", "step_00000006", "step_00000008"]


def test_async_save_at_ep2_resumes_as_a_blocking_save_does(tmp_path):
    """Two ranks: the writer thread plans the save over its own gloo group while training goes on."""
    steps = ["train.steps=4", "train.save_every=2", "parallel.ep=2"]
    run_training(2, tmp_path / "async", *steps, "train.async_save=true")
    run_training(2, tmp_path / "blocking", *steps)
    for name in ("step_00000002", "step_00000004"):
        assert (tmp_path / "async" / "checkpoints" / name / "manifest.json").is_file()
    resumed = run_training(1, tmp_path / "async", "train.steps=6", "train.save_every=2",
                           f"train.resume={tmp_path / 'async' / 'checkpoints' / 'step_00000004'}",
                           "train.allow_schedule_change=true")
    again = run_training(1, tmp_path / "blocking", "train.steps=6", "train.save_every=2",
                         f"train.resume={tmp_path / 'blocking' / 'checkpoints' / 'step_00000004'}",
                         "train.allow_schedule_change=true")
    assert resumed == again

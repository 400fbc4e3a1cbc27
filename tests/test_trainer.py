"""The training system: layouts agree, checkpoints reshard and survive kills, metrics are complete."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from distributed import run_on_ranks
from gatepro_dist.train.checkpoint import latest_checkpoint, read_model_tensors
from gatepro_dist.config import load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.train.parallel import build_parallel_groups, single_process_groups
from gatepro_dist.train.engine import train
from gatepro_dist.train.metrics import METRICS_FILE

TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
    "model.max_seq_len=64", "moe.num_experts=8", "moe.top_k=2", "moe.expert_ffn_dim=32",
    "data.seq_len=32", "data.max_bytes=300000", "train.global_batch_size=8", "train.lr=3e-3",
    "train.warmup_steps=2", "train.eval_every=1000", "train.eval_batches=1", "train.stats_every=2",
    "train.progress=false", "router.gatepro.penalty=1e-2",
]


def tiny_config(run_dir, *overrides, world_size=1):
    return validate(load_config(None, [*TINY, f"train.run_dir={run_dir}", *overrides]), world_size)


def _train_worker(rank, world, run_dir, overrides):
    cfg = tiny_config(run_dir, *overrides, world_size=world)
    groups = build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard)
    return train(cfg, groups, log=lambda *_: None).losses


def run_training(world, run_dir, *overrides) -> list[float]:
    if world == 1:
        cfg = tiny_config(run_dir, *overrides)
        return train(cfg, single_process_groups(), log=lambda *_: None).losses
    return run_on_ranks(world, _train_worker, str(run_dir), list(overrides))[0]


def assert_close_lists(a, b, rel=1e-5):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert abs(x - y) <= rel * abs(y), f"step {i + 1}: {x} vs {y}"


def logged_grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_dp_ep_layouts_follow_the_same_loss_trajectory(tmp_path):
    """Proof that expert and dense gradients are reduced over the right groups: the losses, the
    logged gradient norms (the norm decides clipping: an expert gradient ep times too large hides
    from the loss under AdamW until clipping bites) and the final weights (the checkpoint every
    run writes at its last step) of every dp x ep layout are those of one process."""
    steps = ["train.steps=5", "train.save_every=1000"]
    reference_dir = tmp_path / "1x1"
    reference = run_training(1, reference_dir, *steps, "parallel.ep=1")
    reference_norms = logged_grad_norms(reference_dir)
    reference_weights = read_model_tensors(latest_checkpoint(reference_dir))
    assert len(reference_norms) == 5 and min(reference_norms) > 1.0  # train.grad_clip=1 clips every step
    for dp, ep in [(1, 2), (2, 1), (2, 2)]:
        run_dir = tmp_path / f"{dp}x{ep}"
        losses = run_training(dp * ep, run_dir, *steps, f"parallel.ep={ep}")
        assert_close_lists(losses, reference)
        assert_close_lists(logged_grad_norms(run_dir), reference_norms)
        weights = read_model_tensors(latest_checkpoint(run_dir))
        assert weights.keys() == reference_weights.keys()
        for name, expected in reference_weights.items():
            # Per tensor, not per element: AdamW's first steps divide by |g|, so an element whose
            # gradient is ~0 turns fp32 summation-order noise into a visible update difference.
            rel = ((weights[name] - expected).norm() / expected.norm().clamp_min(1e-12)).item()  # 0: a zero bias
            assert rel <= 1e-5, f"{dp}x{ep}: {name} differs from one process by {rel:.1e} (relative)"
    assert reference[-1] < reference[0]


def test_checkpoint_resumes_at_other_layouts_and_bit_for_bit_at_the_same(tmp_path):
    """Saved at ep=2, resumed at ep=2 (bit for bit), at ep=1, and at ep=4, whose own checkpoint one
    step later resumes at ep=2 again: 2 -> 4 and 4 -> 2 between two expert-parallel sizes, every
    expert's rows landing on their new owner, the losses those of the uninterrupted run."""
    common = ["train.steps=5", "train.save_every=3"]
    full = run_training(2, tmp_path / "full", *common, "parallel.ep=2")
    saved = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert (saved / "manifest.json").is_file()
    manifest = json.loads((saved / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["ep"]) == (3, 2, 2)

    same = run_training(2, tmp_path / "same", *common, "parallel.ep=2", f"train.resume={saved}")
    assert same == full[3:], "resuming at the same layout must continue bit for bit"
    one = run_training(1, tmp_path / "one", *common, "parallel.ep=1", f"train.resume={saved}")
    assert_close_lists(one, full[3:])

    four = run_training(4, tmp_path / "four", *common, "parallel.ep=4", "train.save_every=1",
                        f"train.resume={saved}")
    assert_close_lists(four, full[3:])
    saved_at_ep4 = tmp_path / "four" / "checkpoints" / "step_00000004"
    manifest = json.loads((saved_at_ep4 / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["ep"]) == (4, 4, 4)
    back = run_training(2, tmp_path / "back", *common, "parallel.ep=2", f"train.resume={saved_at_ep4}")
    assert_close_lists(back, full[4:])


KILL_IN_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    real_save = dcp.save
    calls = []
    def save_then_die(*args, **kwargs):
        calls.append(1)
        real_save(*args, **kwargs)          # the shards are on disk ...
        if len(calls) == 2:                 # ... on the second save, die before it is committed
            os.kill(os.getpid(), signal.SIGKILL)
    dcp.save = save_then_die
    from gatepro_dist.cli.train import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run_dir}", "train.steps=6", "train.save_every=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_SAVE, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert latest_checkpoint(run_dir).name == "step_00000002"
    assert (run_dir / "checkpoints" / "step_00000004.partial").is_dir()
    assert not (run_dir / "checkpoints" / "step_00000004").exists()
    resumed = run_training(1, run_dir, "train.steps=6", "train.save_every=2", "train.resume=auto")
    uninterrupted = run_training(1, tmp_path / "uninterrupted", "train.steps=6", "train.save_every=2")
    assert resumed == uninterrupted[2:]  # steps 3..6 from the step-2 checkpoint, bit for bit (same layout)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in records] == uninterrupted


def test_gatepro_off_runs_the_baseline_with_the_same_metrics(tmp_path):
    run_training(1, tmp_path / "on", "train.steps=2")
    run_training(1, tmp_path / "off", "train.steps=2", "router.gatepro.enabled=false")
    on = [json.loads(x) for x in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    off = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert set(on[-1]) == set(off[-1]) and set(on[-1]["moe"][0]) == set(off[-1]["moe"][0])
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "moe"):
        assert key in on[-1]
    for key in ("zero_token_experts", "max_load", "mean_load", "aux_loss", "z_loss", "dropped_tokens",
                "gatepro_penalised", "gatepro_topk_changed", "similarity"):
        assert key in on[-1]["moe"][0]
    assert all(layer["gatepro_penalised"] > 0 for layer in on[-1]["moe"])
    assert all(layer["gatepro_penalised"] == 0 for layer in off[-1]["moe"])
    assert on[-1]["gatepro"] is True and off[-1]["gatepro"] is False


def test_gatepro_schedule_switches_at_the_given_step(tmp_path):
    run_training(1, tmp_path / "s", "train.steps=4", "router.gatepro.schedule=[[0,true],[2,false]]")
    records = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["gatepro"] for r in records] == [True, True, False, False]
    assert [r["moe"][0]["gatepro_penalised"] > 0 for r in records] == [True, True, False, False]

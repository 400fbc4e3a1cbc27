"""gatepro-sweep end to end on a tiny grid: every run trains, one CSV row per run, plots written."""
from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from gatepro_dist.config import ConfigError
from gatepro_dist.sweep import load_sweep
from gatepro_dist.sweep_report import BASE_COLUMNS, RESULT_COLUMNS
from test_trainer import TINY


def write_sweep(tmp_path, grid: str, extra: str = "") -> str:
    overrides = ", ".join([*TINY, "train.steps=3", "train.save_every=3", "train.eval_every=3"])
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: tiny\nout_dir: {tmp_path / 'out'}\nworld: 1\noverrides: [{overrides}]\n"
                    f"grid:\n{grid}\n{extra}")
    return str(path)


@pytest.mark.slow
def test_sweep_runs_every_config_and_writes_one_csv_row_per_run(tmp_path):
    sweep = write_sweep(tmp_path, "  world: [1, 2]\n  router.gatepro.enabled: [true, false]\n",
                        "runs:\n  - {name: swap, router.gatepro.schedule: [[0, true], [2, false]]}\n")
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert list(rows[0]) == BASE_COLUMNS + ["router.gatepro.enabled", "router.gatepro.schedule"] + RESULT_COLUMNS
    assert {r["run"] for r in rows} >= {"world=1_enabled=true", "world=2_enabled=false", "swap"}
    assert all(int(r["steps"]) == 3 and float(r["final_val_loss"]) > 0 for r in rows)
    swap = next(r for r in rows if r["run"] == "swap")
    assert int(swap["gatepro_on_steps"]) == 2
    for png in ("zero_token_experts.png", "val_loss.png", "throughput.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    again = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep], capture_output=True, text=True)
    assert again.stdout.count("already complete") == 5


def test_bad_run_in_a_sweep_is_refused_before_anything_runs(tmp_path):
    sweep = write_sweep(tmp_path, "  moe.top_k: [2, 99]\n")
    with pytest.raises(ConfigError, match="moe.top_k"):
        load_sweep(sweep)
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep], capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_dry_run_prints_one_torchrun_command_per_multi_process_run(tmp_path):
    sweep = write_sweep(tmp_path, "  world: [1, 2]\n")
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep, "--dry-run"],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "torch.distributed.run" not in lines[0] and "--nproc-per-node=2" in lines[1]

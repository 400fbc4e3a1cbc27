"""`gatepro-train` from the user's side: --help, and bad input refused before anything is created."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from test_trainer import TINY


def run_cli(args, tmp_path, world_size=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if world_size is not None:  # what torchrun would export; validation needs no process group
        env.update(RANK="0", WORLD_SIZE=str(world_size), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
    return subprocess.run([sys.executable, "-m", "gatepro_dist.cli.train", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def test_help_lists_the_public_keys(tmp_path):
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0
    for key in ("train.steps", "train.run_dir", "train.seed", "parallel.ep", "moe.num_experts",
                "moe.top_k", "router.gatepro.enabled", "router.gatepro.penalty", "router.gatepro.schedule"):
        assert key in proc.stdout


# A few rows of tests/test_bad_inputs.py's table as separate processes: the console script's
# real exit code, and nothing created in its working directory.
BAD_INPUTS = [
    (["moe.topk=3"], None, "did you mean 'moe.top_k'"),
    (["parallel.ep=3"], 3, "moe.num_experts"),
    (["router.gatepro.penalty=.nan"], None, "router.gatepro.penalty"),
]


@pytest.mark.parametrize("overrides, world, needle", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_before_anything_is_created(tmp_path, overrides, world, needle):
    proc = run_cli([*TINY, "train.run_dir=run", *overrides], tmp_path, world_size=world)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gatepro-train: error:"), proc.stderr
    assert needle in lines[0]
    assert list(tmp_path.iterdir()) == [], "nothing may be created for a refused run"


def test_missing_config_file_is_named(tmp_path):
    proc = run_cli(["missing.yaml"], tmp_path)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr

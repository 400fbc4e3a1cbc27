"""Shared by the launch tests: a tiny training command, a clean environment, and the reference
losses of the plain single-node 2-process run that every other launcher must reproduce."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from test_trainer import TINY

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# Variables a launcher sets; a test process that inherited them would join the wrong job.
LAUNCHER_PREFIXES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_",
                     "MASTER_", "TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "PRTE_",
                     "NNODES", "NODE_RANK", "NPROC_PER_NODE", "GATEPRO_")


def clean_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES)}
    bindir = os.path.dirname(sys.executable)  # this Python's torchrun/mpirun/gatepro-* come first
    env.update(PYTHON=sys.executable, PATH=f"{bindir}:{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def train_args(run_dir, *extra: str, steps: int | None = STEPS) -> list[str]:
    """The TINY model at ep=2 for `steps` steps (None: leave train.steps to a config file)."""
    return [*TINY, "train.eval_batches=1", "train.save_every=1000", "parallel.ep=2",
            f"train.run_dir={run_dir}", *([f"train.steps={steps}"] if steps else []), *extra]


def losses(run_dir) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def steps_done(run_dir) -> int:
    path = Path(run_dir) / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def run(cmd: list[str], env: dict, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, **kwargs)


@functools.lru_cache(maxsize=None)
def reference_losses() -> tuple[float, ...]:
    """torchrun, one node, 2 processes, ep=2: the run the other launchers are compared with."""
    tmp = tempfile.mkdtemp(prefix="gatepro-ref-")
    try:
        proc = run(["bash", "launch/torchrun.sh", *train_args(f"{tmp}/run")], clean_env(NPROC_PER_NODE="2"),
                   timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return tuple(losses(f"{tmp}/run"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def assert_same_losses(got, reference=None) -> None:
    reference = list(reference if reference is not None else reference_losses())
    assert len(got) == len(reference) == STEPS, (got, reference)
    for step, (a, b) in enumerate(zip(got, reference), 1):
        assert abs(a - b) <= 1e-6 * abs(b), f"step {step}: {a} vs reference {b}"

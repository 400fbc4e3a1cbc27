"""A real single-node Slurm cluster (Debian slurm-wlm + munge, started here by
launch/local_slurm.sh): the project's batch scripts train, and a preempted job checkpoints, is
requeued by its own batch script and resumes where it stopped."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from launch_helpers import (REPO, assert_same_losses, clean_env, losses, reference_losses, run, steps_done,
                            train_args)

SLURM_TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """Environment for Slurm client commands against a fresh one-node cluster."""
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd/munged needs root")
    if not all(shutil.which(tool) for tool in SLURM_TOOLS):
        if shutil.which("apt-get") is None:
            pytest.skip("Slurm is not installed and apt-get is not available to install it")
        proc = run(["bash", "launch/local_slurm.sh", "install"], clean_env(), timeout=900)
        assert proc.returncode == 0, f"launch/local_slurm.sh install failed:\n{proc.stderr[-3000:]}"
    state = tmp_path_factory.mktemp("slurm")
    env = clean_env(SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()), CPUS=str(os.cpu_count() or 2),
                    MIN_JOB_AGE="10")  # sbatch --wait then polls every 8 s instead of 32 s
    proc = run(["bash", "launch/local_slurm.sh", "up", str(state)], env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(
        p.read_text() for p in (state / "log").glob("*") if p.is_file())
    env = clean_env(SLURM_CONF=str(state / "slurm.conf"), GATEPRO_HOME=str(REPO))
    yield env
    run(["bash", "launch/local_slurm.sh", "down", str(state)], env, timeout=60)


def job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job_id, "-o"], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(predicate, what: str, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def sbatch(env, cwd, script: str, *args: str, options=()) -> subprocess.CompletedProcess:
    return subprocess.run(["sbatch", "--nodes=1", *options, str(REPO / "launch" / script), *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sbatch_wait_trains_with_the_srun_only_script_and_the_reference_losses(tmp_path, slurm):
    """srun starts both ranks; each learns its rank from SLURM_PROCID and the head node from
    `scontrol show hostnames` (no MASTER_ADDR anywhere)."""
    expected = reference_losses()  # computed before the clock starts: it is not part of this test
    began = time.monotonic()
    proc = sbatch(slurm, tmp_path, "slurm_srun.sbatch", *train_args(tmp_path / "run"),
                  options=["--wait", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path}/out.txt"])
    seconds = time.monotonic() - began
    log = (tmp_path / "out.txt").read_text() if (tmp_path / "out.txt").exists() else ""
    assert proc.returncode == 0, proc.stderr + log[-4000:]
    assert re.search(r"rank map \(slurm; world 2 = dp 1 x ep 2; rendezvous \S+:\d+\)", log), log
    assert_same_losses(losses(tmp_path / "run"), expected)
    print(f"sbatch --wait (srun-only script, 2 ranks, {len(expected)} steps) took {seconds:.1f} s")


@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_itself_and_resumes(tmp_path, slurm):
    """One agent per node (torchrun under srun). First SIGTERM to the job's steps (what Slurm's
    preemption sends), then SIGUSR1 to the batch shell (what `--signal=B:USR1@120` sends before
    the time limit): each time every rank stops at one step with a checkpoint, the batch script
    requeues the job, and the next run resumes from that checkpoint."""
    run_dir, config = tmp_path / "run", tmp_path / "config.yaml"
    config.write_text("train: {steps: 1000}\n")  # long: a signal always lands mid-run, however slow the machine
    began = time.monotonic()
    proc = sbatch({**slurm, "NPROC_PER_NODE": "2"}, tmp_path, "slurm_torchrun.sbatch", str(config),
                  *train_args(run_dir, steps=None),
                  options=["--parsable", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={tmp_path}/out.txt"])
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    stops = []
    for restart, signal_args in enumerate([["--signal=TERM"], ["--batch", "--signal=USR1"]]):
        wait_until(lambda: job(slurm, job_id).get("JobState") == "RUNNING"
                   and job(slurm, job_id).get("Restarts") == str(restart), f"run {restart + 1} to start")
        first = stops[-1] if stops else 0
        wait_until(lambda: steps_done(run_dir) >= first + 2, f"run {restart + 1} to train two steps")
        subprocess.run(["scancel", *signal_args, job_id], env=slurm, check=True)
        wait_until(lambda: job(slurm, job_id).get("Reason") == "BeginTime"
                   and job(slurm, job_id).get("Restarts") == str(restart + 1), "the requeue")
        log = (tmp_path / "out.txt").read_text()
        stops.append(int(re.findall(r"preempted by SIG(?:TERM|USR1) after step (\d+)", log)[-1]))
        assert first + 2 <= stops[-1] == steps_done(run_dir)
        if restart == 1:  # let the last run finish soon: users may change train.steps on resume (a
            # cosine schedule's past lrs then change, which needs train.allow_schedule_change)
            config.write_text(f"train: {{steps: {stops[-1] + 3}, allow_schedule_change: true}}\n")
        # Slurm holds a requeued job for 120 s (BeginTime); lift that, as an admin could. Not within
        # the second of the requeue: slurmd would take the new credential for the revoked old one.
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm, check=True)
    wait_until(lambda: job(slurm, job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the job to end")
    seconds = time.monotonic() - began
    log = (tmp_path / "out.txt").read_text()
    assert job(slurm, job_id).get("JobState") == "COMPLETED", log[-5000:]
    assert "preempted by SIGTERM" in log and "batch shell got SIGUSR1" in log and "preempted by SIGUSR1" in log
    for stop in stops:
        checkpoint = run_dir / "checkpoints" / f"step_{stop:08d}"
        assert (checkpoint / "manifest.json").is_file()
        assert f"resumed from {checkpoint} at step {stop}" in log
    assert log.count(f"gatepro: job {job_id} requeued") == 2 and f"done: {stops[-1] + 3} steps" in log
    assert steps_done(run_dir) == stops[-1] + 3  # each step once: the metrics continue where a run stopped
    print(f"Slurm preemption test: stopped at steps {stops}, requeued twice, done in {seconds:.1f} s")

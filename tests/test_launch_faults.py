"""How a multi-process run ends when it cannot go on: a rank is killed, a rank stops answering,
or the scheduler asks it to stop (preemption). Real processes, real gloo groups, real signals."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gatepro_dist.train.checkpoint import latest_checkpoint
from gatepro_dist.cluster.preemption import EXIT_LOST_RANK, EXIT_PREEMPTED
from launch_helpers import REPO, clean_env, losses, steps_done, train_args
from test_trainer import assert_close_lists, run_training

LONG = 400  # steps: far more than a test waits for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(run_dir, *extra: str, world: int = 2, env_extra=None) -> list[subprocess.Popen]:
    """`world` gatepro-train processes joined through RANK/WORLD_SIZE/MASTER_* (as srun or a
    hand-written launcher would start them), without an agent that could tear them down."""
    port = str(free_port())
    procs = []
    for rank in range(world):
        env = clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=port, **(env_extra or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "gatepro_dist.cli.train", *train_args(run_dir, *extra)],
                                      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_for_steps(run_dir, n: int, procs, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while steps_done(run_dir) < n:
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            outs = [p.communicate(timeout=30) if p.poll() is not None else ("", "") for p in procs]
            pytest.fail(f"training did not reach step {n}: {outs}")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str, float]:
    """Exit code, stdout, stderr and seconds until the process ended (killed after `timeout`)."""
    began = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running {timeout:.0f} s later (hang):\n{err[-3000:]}")
    return proc.returncode, out, err, time.monotonic() - began


def worker_pid(agent_pid: int, rank: int) -> int:
    """The torchrun worker with RANK=`rank` among the agent's children."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in env:
            return int(entry)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_killing_one_rank_makes_the_others_exit_nonzero_within_the_timeout(tmp_path, launcher):
    run_dir, timeout_s = tmp_path / "run", 30
    extra = [f"train.steps={LONG}", "train.save_every=2", f"parallel.timeout_s={timeout_s}"]
    if launcher == "env":
        procs = start_ranks(run_dir, *extra)
        survivor, victim = procs[0], procs[1].pid
    else:
        agent = subprocess.Popen(["bash", "launch/torchrun.sh", *train_args(run_dir, *extra)],
                                 env=clean_env(NPROC_PER_NODE="2"), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        procs, survivor = [agent], agent
    wait_for_steps(run_dir, 3, procs)
    if launcher == "torchrun":
        victim = worker_pid(survivor.pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    code, _, err, seconds = finish(survivor, timeout=timeout_s + 30)
    for p in procs:
        p.kill()
        p.wait()
    assert code != 0 and seconds < timeout_s, (code, seconds, err[-3000:])
    if launcher == "env":  # our own message; under torchrun the agent reports the dead worker itself
        lines = [line for line in err.splitlines() if line.startswith("gatepro-train: error:")]
        assert code == EXIT_LOST_RANK and len(lines) == 1, err[-3000:]
        assert "lost contact with rank(s) 1 during " in lines[0] and "another process died" in lines[0]
        assert f"the last complete checkpoint is {latest_checkpoint(run_dir)}" in lines[0]
    else:
        assert "exitcode  : -9" in err, err[-3000:]  # torchrun names the killed worker


@pytest.mark.slow
def test_a_rank_that_stops_answering_is_reported_after_parallel_timeout_s(tmp_path):
    run_dir, timeout_s = tmp_path / "run", 5
    procs = start_ranks(run_dir, f"train.steps={LONG}", f"parallel.timeout_s={timeout_s}")
    try:
        wait_for_steps(run_dir, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, sockets open, never answers
        code, _, err, seconds = finish(procs[0], timeout=timeout_s + 45)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert code == EXIT_LOST_RANK and seconds < timeout_s + 20, (code, seconds, err[-3000:])
    assert f"no answer within parallel.timeout_s={timeout_s}" in err and "rank(s) 1 " in err, err[-3000:]
    assert "the last complete checkpoint is none (nothing saved yet)" in err


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "preempted"
    # Constant lr after warmup (min_lr_ratio=1): the lr of a step does not depend on train.steps, so
    # the preempted 400-step run and a short uninterrupted run follow the same trajectory.
    constant_lr = "train.min_lr_ratio=1"
    procs = start_ranks(run_dir, f"train.steps={LONG}", constant_lr,
                        env_extra={"GATEPRO_PREEMPTED_MARKER": str(marker)})
    wait_for_steps(run_dir, 2, procs)
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 hears it; rank 0 learns at the step boundary
    results = [finish(p, timeout=120) for p in procs]
    assert [r[0] for r in results] == [EXIT_PREEMPTED] * 2, [r[2][-2000:] for r in results]
    checkpoint = latest_checkpoint(run_dir)
    step = int(checkpoint.name.split("_")[1])
    assert step == steps_done(run_dir) >= 2 and step < LONG  # saved where both stopped, nothing after
    assert marker.read_text().split() == [str(step), str(checkpoint)]
    assert f"preempted by SIGUSR1 after step {step}" in results[0][2]

    # The checkpoint is complete: one process picks it up (resharded to ep=1) and goes on exactly as
    # an uninterrupted run would (other layout, so equal to float rounding, not bit for bit).
    resumed = run_training(1, run_dir, f"train.steps={step + 2}", constant_lr, "train.resume=auto")
    uninterrupted = run_training(1, tmp_path / "uninterrupted", f"train.steps={step + 2}", constant_lr,
                                 "train.eval_batches=1", "train.save_every=1000")
    assert steps_done(run_dir) == step + 2
    assert_close_lists(resumed, uninterrupted[step:])
    assert_close_lists(losses(run_dir), uninterrupted)  # metrics.jsonl: the preempted steps, then these


def test_the_signal_handler_only_records_the_first_signal_and_restores_the_old_one():
    from gatepro_dist.cluster.preemption import PreemptionWatch

    before = signal.getsignal(signal.SIGUSR1)
    watch = PreemptionWatch().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # Python runs handlers between bytecodes
        assert watch.received == signal.SIGUSR1 and watch.agreed(None, None) == signal.SIGUSR1
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before

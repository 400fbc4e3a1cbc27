"""Sections ``resume`` and ``fsdp``: the trainer on one GPU, on the production process group
(world.py), with the quickstart model at ep=1 in bf16.

``resume``: four runs, each in a process of its own: ``full`` trains 15 steps; ``full_again`` does it
once more (the run-to-run difference of this GPU's kernels, 0 when they are deterministic);
``interrupted`` trains the same 15-step configuration but is stopped after step 10 the way a
preemption stops it (the trainer's ``PreemptionWatch`` reports a signal; the trainer saves a
checkpoint and raises ``Preempted``); ``resumed`` starts a new process with ``train.resume=auto`` in
that run directory and trains steps 11 to 15. Losses come from each run's ``metrics.jsonl``. It
passes when the interrupted run matches ``full`` up to step 10 and the resumed one after it, both
within ``max(4 x run-to-run, 1e-6)``; ``max_abs_diff_after_resume`` is the figure to read.

``fsdp``: ``parallel.dp_shard=true`` at world 1. ``gatepro-train`` refuses that layout (it shards over
one process), so this section builds it directly: the point is FSDP2's CUDA path on our model, which
no CPU test reaches: bf16 parameter casts (``MixedPrecisionPolicy``), experts as DTensors, the
computation on their local tensors, DCP checkpoints of sharded state. At one rank FSDP skips its
all-gather and reduce-scatter. It compares the sharded run with the replicated one (bf16 parameters
against bf16 autocast: close, not equal) and the sharded run's own resume, all in this process.
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import torch

from ....cluster.preemption import Preempted, PreemptionWatch
from ....config import load_config
from ....config_checks import validate
from ....train.metrics import METRICS_FILE
from .world import world_of_one

RESUME_OVERRIDES = ("parallel.ep=1", "train.dtype=bf16", "train.warmup_steps=5", "train.progress=false",
                    "data.max_bytes=2000000")
FSDP_AGREEMENT = 2e-2  # relative loss difference, bf16 parameters (FSDP) against bf16 autocast
PHASE_TIMEOUT_S = 150.0


class StopAfter(PreemptionWatch):
    """A preemption watch that 'receives' SIGUSR1 after ``steps`` steps: the trainer asks ``agreed``
    once per step (before its last), and then saves a checkpoint and raises ``Preempted``."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps, self.asked = steps, 0

    def agreed(self, world_group, device):
        self.asked += 1
        if self.asked >= self.steps:
            self.received = signal.SIGUSR1  # what launch/*.sbatch asks Slurm to send before the time limit
        return super().agreed(world_group, device)


def read_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss, from the run's metrics log (the last line of each step wins)."""
    losses = {}
    path = run_dir / METRICS_FILE
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a crash
            continue
        if "step" in record and "loss" in record:
            losses[int(record["step"])] = record["loss"]
    return losses


def train_phase(config: str, overrides: list[str], run_dir: str, device: str, stop_after: int | None = None,
                resume: bool = False, dp_shard: bool = False) -> dict:
    """Train ``config`` with ``overrides`` at world 1 on ``device``; stop after ``stop_after`` steps
    as a preemption would; with ``resume``, continue from the run directory's latest checkpoint."""
    from ....train.engine import train

    run_path = Path(run_dir)
    if not resume:
        shutil.rmtree(run_path, ignore_errors=True)
    cfg = validate(load_config(config, [*overrides, f"train.run_dir={run_path}",
                                        f"train.resume={'auto' if resume else 'none'}"]), 1)
    cfg.parallel.dp_shard = dp_shard  # after validate, which refuses dp_shard at world 1 (module docstring)
    messages, stopped = [], None
    began = time.perf_counter()
    with world_of_one(torch.device(device), dp_shard=dp_shard) as groups:
        try:
            train(cfg, groups, torch.device(device), log=messages.append,
                  preemption=StopAfter(stop_after) if stop_after else None)
        except Preempted as stop:
            stopped = stop.step
    losses = read_losses(run_path)
    return {"losses": {str(k): v for k, v in sorted(losses.items())}, "stopped_after": stopped,
            "messages": messages, "seconds": round(time.perf_counter() - began, 1)}


def train_phase_section(options: dict, note) -> dict:
    """``train_phase`` as a child process's section (the ``resume`` section's phases)."""
    return {**train_phase(**options["phase"]), "passed": True}


def compare_resume(full: dict, again: dict, interrupted: dict, resumed: dict, steps: int, at: int) -> dict:
    def losses(run):
        return {int(k): v for k, v in run["losses"].items()}

    f, a, i, r = losses(full), losses(again), losses(interrupted), losses(resumed)
    complete = (all(s in f and s in a and s in r for s in range(1, steps + 1))
                and all(s in i for s in range(1, at + 1)))
    if not complete:
        return {"passed": False, "error": "a run did not log every step",
                "steps_logged": {"full": len(f), "full_again": len(a), "interrupted": len(i), "resumed": len(r)}}
    noise = max(abs(a[s] - f[s]) for s in range(1, steps + 1))
    before = max(abs(i[s] - f[s]) for s in range(1, at + 1))
    after = max(abs(r[s] - f[s]) for s in range(at + 1, steps + 1))
    tolerance = max(4 * noise, 1e-6)
    resumed_at = [m for m in resumed["messages"] if m.startswith("resumed from")]
    return {"steps": steps, "resume_at": at, "max_abs_diff_after_resume": after, "max_abs_diff_before_stop": before,
            "run_to_run_max_abs_diff": noise, "tolerance": tolerance, "bit_identical_after_resume": after == 0.0,
            "resume_message": resumed_at[0] if resumed_at else None, "interrupted_stopped_after": interrupted["stopped_after"],
            "losses_full": [f[s] for s in range(1, steps + 1)],
            "losses_resumed": [r[s] for s in range(at + 1, steps + 1)],
            "passed": (interrupted["stopped_after"] == at and bool(resumed_at) and before <= tolerance
                       and after <= tolerance)}


def resume_check(run_phase: Callable[[str, dict], dict], config: str, out_dir: Path, device: str, steps: int,
                 at: int, dp_shard: bool = False, note=lambda *_: None, base=RESUME_OVERRIDES) -> dict:
    """The four runs (module docstring), each by ``run_phase(name, train_phase kwargs)``; ``base``:
    the overrides of ``config`` that every run shares."""
    overrides = [*base, f"train.steps={steps}", f"train.save_every={at}", f"train.eval_every={steps}"]
    common = {"config": config, "overrides": overrides, "device": device, "dp_shard": dp_shard}
    plan = {"full": {"run_dir": str(out_dir / "full")}, "full_again": {"run_dir": str(out_dir / "full_again")},
            "interrupted": {"run_dir": str(out_dir / "interrupted"), "stop_after": at},
            "resumed": {"run_dir": str(out_dir / "interrupted"), "resume": True}}
    runs = {}
    for name, kwargs in plan.items():
        runs[name] = run_phase(name, {**common, **kwargs})
        note(name, {k: v for k, v in runs[name].items() if k != "messages"})
        if "losses" not in runs[name]:
            return {"passed": False, "error": f"the {name} run did not finish", "runs": runs}
    return {**compare_resume(runs["full"], runs["full_again"], runs["interrupted"], runs["resumed"], steps, at),
            "seconds_per_run": {name: run.get("seconds") for name, run in runs.items()}}


def _subprocess_phase(options: dict, section_dir: Path):
    from ..gpu_run import run_child

    def run(name: str, kwargs: dict) -> dict:
        left = options["deadline"] - time.time() - 2
        outcome = run_child("gatepro_dist.experiments.bench.gpu_sections.training:train_phase_section",
                            {"phase": kwargs}, min(PHASE_TIMEOUT_S, left), section_dir / f"{name}.log",
                            needs_cuda=True, new_session=False)
        if outcome.result is None:
            return {"error": f"{name}: {outcome.status} after {outcome.elapsed_s} s", "log_tail": outcome.log_tail[-2000:]}
        return outcome.result
    return run


def resume(options: dict, note) -> dict:
    section_dir = Path(options["out"]) / "runs" / "resume"
    return {"config": options["config"], "process_group": "cpu:gloo,cuda:nccl, world 1",
            **resume_check(_subprocess_phase(options, section_dir), options["config"], section_dir, "cuda",
                           options["resume_steps"], options["resume_at"], note=note)}


def fsdp_check(config: str, out_dir: Path, device: str, steps: int, at: int, note=lambda *_: None,
               base=RESUME_OVERRIDES) -> dict:
    def in_process(name: str, kwargs: dict) -> dict:
        return train_phase(**kwargs)

    replicated = train_phase(config, [*base, f"train.steps={steps}", f"train.eval_every={steps}",
                                      f"train.save_every={steps}"], str(out_dir / "replicated"), device)
    note("replicated", {k: v for k, v in replicated.items() if k != "messages"})
    sharded = resume_check(in_process, config, out_dir / "sharded", device, steps, at, dp_shard=True, note=note,
                           base=base)
    if "losses_full" not in sharded:
        return sharded
    reference = [replicated["losses"][str(s)] for s in range(1, steps + 1)]
    agreement = max(abs(a - b) / abs(b) for a, b in zip(sharded["losses_full"], reference))
    return {"sharded_resume": sharded, "losses_replicated": reference,
            "max_rel_diff_sharded_vs_replicated": agreement, "agreement_tolerance": FSDP_AGREEMENT,
            "passed": sharded["passed"] and agreement <= FSDP_AGREEMENT}


def fsdp(options: dict, note) -> dict:
    return {"config": options["config"], "layout": "parallel.dp_shard=true at world 1 (built directly)",
            **fsdp_check(options["config"], Path(options["out"]) / "runs" / "fsdp", "cuda",
                         options["fsdp_steps"], options["fsdp_at"], note=note)}

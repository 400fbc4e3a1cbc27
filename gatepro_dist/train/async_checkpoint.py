"""``train.async_save``: checkpoints written in the background with DCP's ``async_save`` while training
goes on, with the same atomicity as a blocking save (``checkpoint.py``).

A save copies the state (DCP's default stager, before ``async_save`` returns: later updates cannot
leak into it) and writes it into ``step_XXXXXXXX.partial`` on a thread. It is *published* -- the
trainer state, checksums, manifest, rename and the ``latest`` pointer -- only by ``finish``, which
every rank calls at the same point: before the next save starts (so at most one save is in flight),
before a preempted or finished run returns, and when the trainer asks. A process killed while a
save is in flight leaves a ``.partial`` directory that is never read, and ``latest`` still names the
previous complete checkpoint.

The writer thread coordinates the ranks' save plans over a process group of its own (gloo, made
once, collectively): collectives from that thread must never interleave with the training loop's
on the same group.
"""
from __future__ import annotations

import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from ..cluster import faults
from .checkpoint import (CHECKPOINTS, FORMAT, FULL, TRAINER_STATE, CheckpointSaveError, _attempt, _nbytes, _publish,
                         _reason, _state, _write_json, agree_on_error, file_checksums, latest_checkpoint)
from .parallel import ParallelGroups


@dataclass
class _InFlight:
    future: Future
    partial: Path
    final: Path
    manifest: dict
    trainer_state: dict
    nbytes: int


class AsyncCheckpointer:
    """At most one checkpoint in flight; ``save`` returns once the state is copied. Collective."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups
        # One more gloo group, for the writer thread's save planning (see the module docstring).
        self.group = dist.new_group(backend="gloo") if groups.world_size > 1 else None
        self.in_flight: _InFlight | None = None

    def save(self, run_dir: str | Path, step: int, model: nn.Module, optimizer, trainer_state: dict,
             config: dict, config_hash: str) -> None:
        self.finish()
        groups = self.groups
        root = Path(run_dir) / CHECKPOINTS
        partial, final = root / f"step_{step:08d}.partial", root / f"step_{step:08d}"
        error = None
        if groups.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            error = _attempt(lambda: partial.mkdir(parents=True))
        error = agree_on_error(error, groups)
        if error is not None:
            raise CheckpointSaveError(f"saving checkpoint {final} failed: {error}; the previous checkpoint "
                                      f"{latest_checkpoint(run_dir) or '(none)'} is intact")
        state = _state(model, optimizer, groups, materialize=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            future = dcp.async_save(state, checkpoint_id=str(partial), process_group=self.group,
                                    no_dist=groups.world_size == 1)
        manifest = {"format": FORMAT, "kind": FULL, "step": step, "world_size": groups.world_size,
                    "ep": groups.ep, "dp": groups.dp, "config_hash": config_hash, "config": config}
        self.in_flight = _InFlight(future, partial, final, manifest, trainer_state, _nbytes(state))

    def finish(self) -> Path | None:
        """Wait for the save in flight (if any) and publish it on every rank; returns its path."""
        pending, self.in_flight = self.in_flight, None
        if pending is None:
            return None
        groups, error = self.groups, None
        try:
            pending.future.result()
        except Exception as err:  # DCP raises the same failure on every rank
            error = _reason(err, pending.partial.parent, pending.nbytes)
        faults.point("checkpoint")
        if error is None and groups.is_main:
            error = _attempt(lambda: _write_json(pending.partial / TRAINER_STATE, pending.trainer_state))
        error = agree_on_error(error, groups)
        if error is None:
            manifest = {**pending.manifest, "files": file_checksums(pending.partial, groups)}
            if groups.is_main:
                error = _attempt(lambda: _publish(pending.partial, pending.final, manifest))
            error = agree_on_error(error, groups)
        if error is not None:
            if groups.is_main:
                shutil.rmtree(pending.partial, ignore_errors=True)
            previous = latest_checkpoint(pending.final.parent.parent)
            raise CheckpointSaveError(
                f"saving checkpoint {pending.final} failed: {error}; the previous checkpoint "
                f"{previous or '(none)'} is intact; free space or fix {pending.final.parent}, then rerun "
                "with train.resume=auto")
        return pending.final

    def close(self) -> None:
        """Publish what is in flight and free the writer's process group."""
        self.finish()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None

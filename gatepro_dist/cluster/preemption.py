"""How a run ends early: the scheduler asks it to stop, or another rank is gone.

Preemption. SIGTERM or SIGUSR1 only sets a flag in the handler. At every step boundary the trainer
all-reduces the flag (MAX over the world), so all ranks stop after the *same* step even when the
signal reached them at different times; they write a checkpoint together and the CLI exits with
EXIT_PREEMPTED. The launch scripts turn that into a Slurm requeue, and the next start resumes with
train.resume=auto.

Lost ranks. When a peer dies, gloo raises at once (connection reset); when it hangs, it raises after
parallel.timeout_s. `lost_contact_message` turns that error into one line naming the collective and
the ranks that stopped answering (found through the rendezvous store), and the last complete
checkpoint; the CLI prints it and exits with EXIT_LOST_RANK instead of hanging.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

# Exit codes of gatepro-train (documented in docs/launch.md).
EXIT_FAILED = 1  # a save failed, or train.nan_policy=stop met a non-finite step (one-line message)
EXIT_BAD_INPUT = 2
EXIT_LOST_RANK = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later" -- the batch script requeues

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteStop(FloatingPointError):
    """train.nan_policy=stop met a non-finite loss or gradient (a checkpoint was saved first)."""


class Preempted(Exception):
    """Raised by the trainer after every rank agreed to stop and the checkpoint is on disk."""

    def __init__(self, step: int, signal_number: int, checkpoint: Optional[Path]):
        self.step, self.signal_number, self.checkpoint = step, signal_number, checkpoint
        name = signal.Signals(signal_number).name if signal_number else "a signal"
        super().__init__(f"preempted by {name} after step {step}; checkpoint {checkpoint}")


class PreemptionWatch:
    """Remembers the first preemption signal; `agreed` asks every rank whether any got one."""

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received = 0  # signal number, 0 = none
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if not self.received:
            self.received = signum
            # One line, so a user knows the signal arrived and that the run is not hanging.
            os.write(2, f"gatepro: got {signal.Signals(signum).name}; stopping after this step "
                        f"with a checkpoint\n".encode())

    def install(self) -> "PreemptionWatch":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def agreed(self, world_group, device: torch.device) -> int:
        """Collective over the world: the signal any rank received (0 if none). Same on all ranks."""
        if world_group is None:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=world_group)
        return int(flag.item())


# ---- lost ranks -----------------------------------------------------------------------------

_LOST_CONTACT_MARKERS = (
    "Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
    "Timed out", "timed out", "Socket Timeout", "ECONNRESET", "EPIPE", "NCCL communicator was aborted",
    "watchdog",
)


def is_lost_contact(err: BaseException) -> bool:
    """A collective failed because a peer died or stopped answering (not a bug in our code)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _LOST_CONTACT_MARKERS)


def failed_collective(err: BaseException) -> str:
    """'all_reduce in optim.py:reduce_gradients': the torch.distributed call and the innermost
    caller of ours outside comm.py (whose wrappers are called from everywhere)."""
    op, ours = None, []
    for frame in traceback.extract_tb(err.__traceback__):
        path = frame.filename.replace(os.sep, "/")
        if "torch/distributed/distributed_c10d" in path and not frame.name.startswith("_") and frame.name != "wrapper":
            op = op or frame.name
        elif "gatepro_dist/" in path and "/cli/" not in path:
            ours.append(f"{path.rsplit('gatepro_dist/', 1)[1]}:{frame.name}")
    caller = next((f for f in reversed(ours) if not f.startswith("comm.py")), ours[-1] if ours else None)
    if caller and ours[-1] != caller:
        caller += f" via {ours[-1]}"  # e.g. trainer.py:train via comm.py:backward
    op = op or "a collective"
    return f"{op} in {caller}" if caller else op


def find_lost_ranks(grace_s: float) -> Optional[list[int]]:
    """Ranks that did not check in through the rendezvous store within `grace_s`; None if the store
    is gone too (it lives in rank 0's process, or in torchrun's agent)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set(f"gatepro/alive/{rank}", "1")
        deadline = time.monotonic() + grace_s
        while True:
            alive = {r for r in range(world) if store.check([f"gatepro/alive/{r}"])}
            if len(alive) == world or time.monotonic() > deadline:
                return sorted(set(range(world)) - alive)
            time.sleep(0.1)
    except Exception:  # the store's host is gone as well
        return None


def lost_contact_message(err: BaseException, timeout_s: float, last_checkpoint) -> str:
    timed_out = "timed out" in str(err).lower() or "timeout" in str(err).lower()
    lost = find_lost_ranks(grace_s=min(3.0, max(timeout_s / 4, 0.5)))
    who = (", ".join(map(str, lost)) if lost else "unknown") if lost is not None \
        else "unknown (the rendezvous store is unreachable too: rank 0 or its node is likely gone)"
    why = (f"no answer within parallel.timeout_s={timeout_s:g}" if timed_out else
           "another process died")
    return (f"lost contact with rank(s) {who} during {failed_collective(err)} — {why}; "
            f"the last complete checkpoint is {last_checkpoint or 'none (nothing saved yet)'}")

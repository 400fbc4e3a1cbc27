"""Run a function on N local processes joined by a gloo process group (benchmarks and tests).

Ranks are forked from a forkserver that imported torch and the engine once, so every call gets
fresh processes (no state carried between calls) without paying the imports again: a spawned
rank re-imports torch, DCP and FSDP, about 6 s of CPU per rank on a small machine. The server
itself only imports; it never runs an operator, a thread pool or a group, so forking it is safe.

A forked rank would inherit the server's environment and working directory, fixed when the server
started; each rank takes the caller's at the time of the call instead, as a spawned one does (and
re-reads GATEPRO_FAULT, the one variable the engine reads at import).
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from . import faults
from ..train.parallel import close_process_groups, exit_process, live_gloo_threads

# What the forkserver imports before it forks any rank: torch, the distributed parts the engine
# uses, and the engine. A module missing here is imported by the rank itself (slower, not wrong).
PRELOAD = ("torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "gatepro_dist.train.trainer")


def _entry(rank, world_size, init_file, result_dir, threads, environ, cwd, fn, args):
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    faults.install(os.environ.get(faults.ENV))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result = ("ok", fn(rank, world_size, *args))
    except BaseException:  # carried to the parent, which raises with the worker's traceback
        result = ("error", traceback.format_exc())
    with open(os.path.join(result_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    close_process_groups()
    # The result is on disk. If gloo threads outlived the groups (in torch 2.13 importing
    # torch.distributed._shard, which DCP imports, after init_process_group holds the default
    # group; tests import inside workers), leave without the finalisation they can abort.
    if live_gloo_threads():
        exit_process(0)


def run_on_ranks(world_size: int, fn, *args, threads: int = 1) -> list:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes; return each result.

    ``fn`` must be importable (a module-level function). A failure on any rank raises
    RuntimeError with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.set_forkserver_preload(list(PRELOAD))  # read when the server starts (once per process)
        caller = (dict(os.environ), os.getcwd())
        mp.start_processes(_entry, args=(world_size, init_file, tmp, threads, *caller, fn, args),
                           nprocs=world_size, join=True, start_method="forkserver")
        results = []
        for rank in range(world_size):
            with open(os.path.join(tmp, f"{rank}.pkl"), "rb") as f:
                status, value = pickle.load(f)
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results

"""`gatepro-train CONFIG [key=value ...]`: train an MoE language model with the GatePro router.

Works standalone (one process) and under torchrun, srun or mpirun with any number of processes
(see docs/launch.md). Every check on the configuration, the data and the launcher's environment
runs before a process group or any file is created; a bad input exits with code 2 and one line
naming the problem and the fix. Exit codes: 0 done, 1 the run failed (a checkpoint could not be
saved, or train.nan_policy=stop met a non-finite step), 2 bad input (configuration, data, launch
environment or checkpoint), 3 lost contact with another rank, 75 preempted (checkpoint written;
requeue and resume with train.resume=auto).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from ..cluster import faults
from ..cluster.preemption import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_LOST_RANK, EXIT_PREEMPTED, NonFiniteStop,
                          Preempted, PreemptionWatch, is_lost_contact, lost_contact_message)
from ..cluster.topology import (TopologyError, complete_world, detect_topology, find_rendezvous, init_distributed,
                        rank_map)
from ..config import ConfigError, help_text, load_config
from ..config_checks import validate
from ..moe.experts import describe_expert_kernel
from ..train.checkpoint import CheckpointError, CheckpointSaveError, preflight_resume
from ..data import DataError
from ..train.numerics import describe_optimizer
from ..train.parallel import build_parallel_groups, close_process_groups, exit_process

USAGE = """usage: gatepro-train [CONFIG.yaml] [key=value ...]

Train a Mixture-of-Experts language model whose router is GatePro.
  torchrun --nproc-per-node 2 -m gatepro_dist.cli.train configs/quickstart.yaml train.steps=100

Keys (dotted, override any YAML value; values are parsed as YAML):
"""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"gatepro-train: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + help_text())
        return 0
    config_path = args.pop(0) if args and "=" not in args[0] else None
    try:
        faults.check()  # a malformed GATEPRO_FAULT (reliability testing) is bad input too
        topology = complete_world(detect_topology())  # ranks from torchrun, Slurm, MPI or PMIx
        cfg = validate(load_config(config_path, args), topology.world_size)
        from ..train.engine import train  # torch-heavy imports after the cheap checks
        from ..train.step import load_data

        preflight_resume(cfg.train.run_dir, cfg.train.resume, cfg.to_dict())
        data = load_data(cfg)
        topology = find_rendezvous(topology)  # may ask scontrol or MPI; checks MASTER_ADDR resolves
    except (ConfigError, DataError, TopologyError, CheckpointError) as err:
        return fail(str(err))

    preemption = PreemptionWatch().install()  # SIGTERM/SIGUSR1 now mean: checkpoint, then exit 75
    try:
        device = init_distributed(topology, cfg.parallel.backend, cfg.parallel.timeout_s)
        code = _run(cfg, topology, device, data, train, preemption)
    except Preempted as stop:
        code = _preempted(stop, topology)
    except CheckpointError as err:  # e.g. every checkpoint damaged: found by all ranks together
        code = _stop(str(err), EXIT_BAD_INPUT, topology)
    except (CheckpointSaveError, NonFiniteStop) as err:
        code = _stop(str(err), EXIT_FAILED, topology)
    except Exception as err:
        if not is_lost_contact(err):
            raise
        if not dist.is_initialized():
            return fail(f"could not join the job at {topology.master_addr}:{topology.master_port} "
                        f"within parallel.timeout_s={cfg.parallel.timeout_s:g}: {str(err).splitlines()[0]}",
                        EXIT_LOST_RANK)
        from ..train.checkpoint import latest_checkpoint

        message = lost_contact_message(err, cfg.parallel.timeout_s, latest_checkpoint(cfg.train.run_dir))
        print(f"gatepro-train: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_LOST_RANK)  # a broken gloo/NCCL group can block in its destructor: leave now
    close_process_groups()  # every rank ended together; the model and groups of _run are gone
    return code


def _run(cfg, topology, device, data, train, preemption) -> int:
    groups = build_parallel_groups(cfg.parallel.ep, device.type, cfg.parallel.dp_shard)
    table = rank_map(topology, groups)
    if groups.is_main:
        print("gatepro-train: " + table, flush=True)
        print(f"gatepro-train: world={groups.world_size} ep={groups.ep} dp={groups.dp} "
              f"device={device.type} run_dir={cfg.train.run_dir}", flush=True)
        rows_dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        print(f"gatepro-train: {describe_expert_kernel(device, rows_dtype, cfg.moe.grouped_gemm)}", flush=True)
        print(f"gatepro-train: {describe_optimizer(cfg.train, device, cfg.train.backend, cfg.deepspeed.zero_stage)}",
              flush=True)
    result = train(cfg, groups, device, data=data, preemption=preemption)
    if groups.is_main:
        from ..train.report import write_report

        report = write_report(result.run_dir)
        if not result.losses:  # resumed a run that had already finished
            print(f"gatepro-train: {result.run_dir} already finished its {result.steps_done} steps; "
                  f"report: {report}", flush=True)
        else:
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
            print(f"gatepro-train: done: {result.steps_done} steps, final loss {result.losses[-1]:.4f}, "
                  f"val loss {val}; report: {report}", flush=True)
    return 0


def _stop(message: str, code: int, topology) -> int:
    """Every rank met the same failure; rank 0 says it once."""
    if topology.rank == 0:
        fail(message, code)
    return code


def _preempted(stop: Preempted, topology) -> int:
    """Every rank saved step `stop.step` together; exit so that the batch script requeues."""
    if topology.rank == 0:
        print(f"gatepro-train: {stop}; exiting with {EXIT_PREEMPTED} so the job is requeued "
              f"(the next start resumes with train.resume=auto)", file=sys.stderr, flush=True)
        marker = os.environ.get("GATEPRO_PREEMPTED_MARKER")  # set by launch/*.sbatch
        if marker:
            with open(marker, "w") as fh:
                fh.write(f"{stop.step} {stop.checkpoint}\n")
    return EXIT_PREEMPTED


def run() -> None:
    """The ``gatepro-train`` console script and ``python -m gatepro_dist.cli.train``."""
    exit_process(main())


if __name__ == "__main__":
    run()

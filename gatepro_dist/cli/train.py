"""`gatepro-train CONFIG [key=value ...]`: train an MoE language model with the GatePro router.

Works standalone (one process) and under torchrun with any number of processes. Every check
on the configuration and the data runs before a process group or any file is created; a bad
input exits with code 2 and one line naming the problem and the fix.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

from ..config import ConfigError, help_text, load_config, validate
from ..data import DataError
from ..topology import detect_topology, init_distributed

USAGE = """usage: gatepro-train [CONFIG.yaml] [key=value ...]

Train a Mixture-of-Experts language model whose router is GatePro.
  torchrun --nproc-per-node 2 -m gatepro_dist.cli.train configs/quickstart.yaml train.steps=100

Keys (dotted, override any YAML value; values are parsed as YAML):
"""


def fail(message: str) -> int:
    print(f"gatepro-train: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + help_text())
        return 0
    config_path = args.pop(0) if args and "=" not in args[0] else None
    topology = detect_topology()
    try:
        cfg = validate(load_config(config_path, args), topology.world_size)
        from ..trainer import load_data, train  # torch-heavy imports after the cheap checks

        data = load_data(cfg)
    except (ConfigError, DataError) as err:
        return fail(str(err))

    device = init_distributed(topology, cfg.parallel.backend, cfg.parallel.timeout_s)
    from ..parallel import build_parallel_groups

    groups = build_parallel_groups(cfg.parallel.ep, device.type)
    if groups.is_main:
        print(f"gatepro-train: world={groups.world_size} ep={groups.ep} dp={groups.dp} "
              f"device={device.type} run_dir={cfg.train.run_dir}", flush=True)
    result = train(cfg, groups, device, data=data)
    if groups.is_main:
        from ..report import write_report

        report = write_report(result.run_dir)
        final = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
        print(f"gatepro-train: done: {result.steps_done} steps, final loss {final}, "
              f"val loss {val}; report: {report}", flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`gatepro-plan CONFIG [overrides] --world N --gpu-mem GiB`: what one rank needs, and whether it fits.

    gatepro-plan configs/plans/mixtral_8x7b.yaml --world 1024 --gpu-mem 80
    gatepro-plan configs/quickstart.yaml parallel.dp_shard=true --world 4 --gpu-mem 24
    gatepro-plan --markdown configs/plans/plans.yaml  # the table in docs/scaling.md

Builds the model on the meta device under a fake process group of N ranks (nothing is allocated,
nothing communicates) and shards it as the trainer would, so parameter, gradient and AdamW bytes
are each rank's real shards, padding included; rank 0 holds the largest. Activations follow
from the tensors the model keeps for backward, with routing spread evenly (gatepro_dist/train/plan.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..config import ConfigError, load_config
from ..config_checks import validate
from ..train.plan import (GiB, activation_bytes, cast_weight_bytes, comm_bytes_per_step, peak_bytes, state_bytes,
                          tokens_per_micro_batch)

MODES = ("none", "moe", "block")


def plan_rows(cfg, world: int) -> dict:
    state = state_bytes(cfg, world)
    tokens = tokens_per_micro_batch(cfg, world)
    return {
        "state": state,
        "tokens": tokens,
        "activations": {m: activation_bytes(cfg, tokens, m) + cast_weight_bytes(cfg, m) for m in MODES},
        "peak": {m: peak_bytes(cfg, world, state, m) for m in MODES},
        "comm": comm_bytes_per_step(cfg, world, state),
    }


def describe(name: str, cfg, world: int, gpu_mem_gib: float, plan: dict) -> str:
    s, p = plan["state"], cfg.parallel
    layout = f"{'FSDP (parallel.dp_shard)' if p.dp_shard else 'replicated'}, ep={p.ep}, edp={world // p.ep}"
    lines = [
        f"{name} at world {world} ({layout}), {gpu_mem_gib:g} GiB per GPU, train.dtype={cfg.train.dtype}",
        f"model: {s.total_params / 1e9:.2f} B parameters ({s.expert_params / 1e9:.2f} B in experts); "
        f"{plan['tokens']} tokens per rank per micro-batch",
        "",
        f"{'per rank (rank 0, the largest)':<44}{'GiB':>10}",
        f"{'  weights, fp32':<44}{s.params / GiB:>10.2f}",
        f"{'  gradients, fp32':<44}{s.grads / GiB:>10.2f}",
        f"{'  AdamW state':<44}{s.optimizer / GiB:>10.2f}",
    ]
    for mode in MODES:
        lines.append(f"{'  activations, checkpointing ' + mode:<44}{plan['activations'][mode] / GiB:>10.2f}")
    lines.append("")
    for mode in MODES:
        peak = plan["peak"][mode]
        verdict = "fits" if peak <= gpu_mem_gib * GiB else "does not fit"
        lines.append(f"{'peak, checkpointing ' + mode:<44}{peak / GiB:>10.2f}   {verdict}")
    lines += ["", f"{'sent per rank per step (train.activation_checkpointing=' + cfg.train.activation_checkpointing + ')':<44}"]
    for kind, nbytes in plan["comm"].items():
        lines.append(f"{'  ' + kind:<44}{nbytes / GiB:>10.3f}")
    return "\n".join(lines)


def markdown(plans_file: str) -> str:
    """One row per setup of a plans file (configs/plans/plans.yaml): a config, overrides, a world size."""
    spec = yaml.safe_load(Path(plans_file).read_text())
    mem = float(spec["gpu_mem_gib"])
    rows = ["| setup | GPUs | layout | parameters | per rank: weights + grads + AdamW | activations (none / block) "
            f"| peak (none / block) | fits in {mem:g} GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for setup in spec["setups"]:
        world = int(setup["world"])
        cfg = validate(load_config(str(Path(plans_file).parent / setup["config"]), setup.get("overrides", [])), world)
        plan = plan_rows(cfg, world)
        s = plan["state"]
        fits = [m for m in MODES if plan["peak"][m] <= mem * GiB]
        rows.append(
            f"| {setup['name']} | {world} | {'FSDP' if cfg.parallel.dp_shard else 'replicated'}, "
            f"ep={cfg.parallel.ep}, {plan['tokens']} tokens/micro-batch | {s.total_params / 1e9:.1f} B "
            f"| {(s.params + s.grads + s.optimizer) / GiB:.1f} GiB "
            f"| {plan['activations']['none'] / GiB:.1f} / {plan['activations']['block'] / GiB:.1f} GiB "
            f"| {plan['peak']['none'] / GiB:.1f} / {plan['peak']['block'] / GiB:.1f} GiB "
            f"| {'with checkpointing ' + ' or '.join(fits) if fits else 'no'} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gatepro-plan", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="+", help="a YAML config, then key=value overrides (with --markdown: a plans file)")
    parser.add_argument("--world", type=int, help="number of ranks (GPUs)")
    parser.add_argument("--gpu-mem", type=float, help="memory of one GPU in GiB")
    parser.add_argument("--markdown", action="store_true", help="a table of every plan file's `plan:` setups")
    args = parser.parse_intermixed_args(argv)
    try:
        if args.markdown:
            print(markdown(args.config[0]))
            return 0
        if args.world is None or args.gpu_mem is None:
            raise ConfigError("gatepro-plan needs --world N and --gpu-mem GiB (e.g. --world 64 --gpu-mem 80)")
        if args.world < 1 or args.gpu_mem <= 0:
            raise ConfigError(f"--world {args.world} --gpu-mem {args.gpu_mem:g}: give a positive rank count and memory")
        path, overrides = args.config[0], args.config[1:]
        cfg = validate(load_config(path, overrides), args.world)
        print(describe(path, cfg, args.world, args.gpu_mem, plan_rows(cfg, args.world)))
    except ConfigError as err:
        print(f"gatepro-plan: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Training steps/s of the quickstart model, eager vs ``train.compile=true``, side by side.

    gatepro-bench compile [--steps 30] [--warmup 3] [--layouts 1x1,2x2] [KEY=VALUE ...]

For each layout ("processes x ep") one set of gloo ranks builds the model twice from the same
config and seed, as ``set_up_run`` does, once eager and once with ``compile_blocks``, and runs their
training steps alternately (eager step, compiled step, ...): forward, backward with the trainer's
gradient reduction, clipping and AdamW, on the same batches. Alternating step by step makes a load
change on the machine touch both equally. The first ``--warmup`` steps of each (the compiled
model compiles in its first) are not timed; the table gives the median wall time per step of the
slowest rank as steps/s, the speedup, the CPU seconds per step (this process's, all its threads;
less sensitive than wall time to other work on a shared machine) and the compiled model's first
step (compile included).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
LAYOUTS = {"1x1": (1, 1), "2x1": (2, 1), "2x2": (2, 2)}  # "processes x ep"


def _time_steps(rank: int, world: int, config: str, overrides: list[str], steps: int) -> dict:
    """One rank: wall and CPU seconds of each step of the eager and the compiled model, alternating."""
    import torch

    from ...config import load_config
    from ...train.numerics import adamw
    from ...train.optim import clip_gradients, global_grad_norm, gradient_sync, param_groups
    from ...train.parallel import build_parallel_groups, single_process_groups
    from ...train.step import load_data, micro_batch_loss, my_part, set_up_run

    cfg = load_config(config, overrides)
    groups = build_parallel_groups(cfg.parallel.ep, "cpu") if world > 1 else single_process_groups()
    device, data = torch.device("cpu"), load_data(cfg)
    runs = {}
    for compiled in (False, True):
        variant = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, compile=compiled))
        setup = set_up_run(variant, groups, device, data)
        optimizer = adamw(param_groups(setup.model, cfg.train.weight_decay), cfg.train, device)
        runs[compiled] = (setup.model, optimizer, gradient_sync(setup.model, groups), setup.sampler, [], [])
    for step in range(steps):
        for model, optimizer, reducer, sampler, times, cpu_times in runs.values():
            begin, cpu_begin = time.perf_counter(), time.process_time()
            (part,) = my_part(sampler.global_batch(step), 1, groups)
            inputs, targets = data.train.batch(part)
            _, loss, _ = micro_batch_loss(model, inputs, targets)
            reducer.arm(last_micro_batch=True)
            loss.backward()
            reducer.finish()
            clip_gradients(model, global_grad_norm(model, groups), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - begin)
            cpu_times.append(time.process_time() - cpu_begin)
    return {"eager": runs[False][4], "compiled": runs[True][4], "eager_cpu": runs[False][5],
            "compiled_cpu": runs[True][5]}


def measure(layout: str, config: str, overrides: list[str], steps: int) -> dict[str, list[float]]:
    """Per-step seconds of the slowest rank: wall (``eager``, ``compiled``) and CPU (``*_cpu``)."""
    from ...cluster.spawn import run_on_ranks

    nproc, ep = LAYOUTS[layout]
    overrides = [*overrides, f"parallel.ep={ep}", "train.grad_accum=1"]
    threads = max(1, (os.cpu_count() or 2) // nproc)
    if nproc == 1:
        import torch

        torch.set_num_threads(threads)
        per_rank = [_time_steps(0, 1, config, overrides, steps)]
    else:
        per_rank = run_on_ranks(nproc, _time_steps, config, overrides, steps, threads=threads)
    return {kind: [max(rank[kind][i] for rank in per_rank) for i in range(steps)] for kind in per_rank[0]}


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="steps of each model, warm-up included")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layouts", default="1x1,2x2", help=f"comma-separated, from {sorted(LAYOUTS)}")
    parser.add_argument("overrides", nargs="*", help="dotted config keys for both models, e.g. model.n_layers=2")
    args = parser.parse_args(argv)
    layouts = [name.strip() for name in args.layouts.split(",")]
    if any(name not in LAYOUTS for name in layouts):
        parser.error(f"--layouts {args.layouts!r}: choose from {sorted(LAYOUTS)}")
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    print(f"{'procs x ep':<11}{'eager steps/s':>15}{'compiled steps/s':>18}{'speedup':>9}"
          f"{'eager cpu s':>13}{'compiled cpu s':>16}{'cpu ratio':>11}{'1st compiled s':>16}")
    for layout in layouts:
        seconds = measure(layout, args.config, args.overrides, args.steps)
        median = {kind: statistics.median(values[args.warmup:]) for kind, values in seconds.items()}
        eager, compiled = 1 / median["eager"], 1 / median["compiled"]
        print(f"{layout:<11}{eager:>15.3f}{compiled:>18.3f}{compiled / eager:>8.2f}x"
              f"{median['eager_cpu']:>13.3f}{median['compiled_cpu']:>16.3f}"
              f"{median['eager_cpu'] / median['compiled_cpu']:>10.2f}x{seconds['compiled'][0]:>16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

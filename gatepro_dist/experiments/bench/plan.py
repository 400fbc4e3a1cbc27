"""gatepro-plan's predictions beside what real ranks use: held bytes and the peak of a training step.

    gatepro-bench plan [--config configs/quickstart.yaml] [--steps 2] [--world 2] [--heap keep] [overrides ...]

For each layout (world 2 and 4; replicated and ``parallel.dp_shard``), real gloo ranks build the
model, shard it as the trainer does and take ``--steps`` training steps (forward, cross-entropy,
backward, gradient reduction, clipping, AdamW) on random tokens. Per rank: the bytes of weights,
gradients and AdamW state it holds (exact counts), and the resident memory the run added at its
peak: VmHWM after the steps minus VmRSS before the model was built (interpreter, libraries and
process groups are not part of a plan), freed heap memory handed back (malloc_trim) before the
last step, whose own peak is measured as in ``gatepro-bench checkpointing``; and the most bytes of
tensors the main thread had alive at once (``_peak_tensor_bytes_allocated``). "resident" is what
the run held between steps (weights, AdamW state, and whatever else stayed allocated: the plan
counts tensors, not a communication library's buffers). Beside each, gatepro-plan's prediction
for that rank, and the ratio. The largest rank is shown.

A plan predicts live memory. By default glibc serves blocks of up to 32 MiB from heaps that keep
freed memory resident, so a step's VmHWM counts memory freed earlier in the step (the CPU
analogue of the CUDA caching allocator's reserved bytes). The ranks therefore run with
``MALLOC_MMAP_THRESHOLD_`` at 128 KiB (``--heap return``, the default): every block larger than
that is handed back to the kernel when freed, and VmHWM follows live memory. ``--heap keep``
measures glibc's default behaviour.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ...cluster.spawn import run_on_ranks
from ...config import ConfigError, load_config
from ...config_checks import validate
from .rounds import resident_bytes_after_trim, step_peak_bytes

LAYOUTS = (  # (world, overrides)
    (2, ["parallel.ep=2"]),
    (2, ["parallel.ep=2", "parallel.dp_shard=true"]),
    (4, ["parallel.ep=2"]),
    (4, ["parallel.ep=2", "parallel.dp_shard=true"]),
    (4, ["parallel.ep=1", "parallel.dp_shard=true"]),
)
MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"
MODEL = ["model.d_model=384", "model.n_layers=4", "model.n_heads=6", "model.n_kv_heads=2", "moe.num_experts=16",
         "moe.expert_ffn_dim=768", "data.seq_len=256", "model.max_seq_len=256", "train.global_batch_size=32"]


def _worker(rank: int, world: int, config: str, overrides: list[str], steps: int) -> dict:
    from ...moe.comm import local_tensor
    from ...train.model import Transformer
    from ...train.numerics import adamw
    from ...train.optim import clip_gradients, global_grad_norm, gradient_sync, param_groups
    from ...train.parallel import build_parallel_groups
    from ...train.sharding import shard_model
    from ...train.step import autocast

    cfg = validate(load_config(config, overrides), world)
    groups = build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard)
    before = resident_bytes_after_trim(dist.barrier)
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    if groups.dp_shard:
        shard_model(model, cfg, groups)
    optimizer = adamw(param_groups(model, cfg.train.weight_decay), cfg.train, torch.device("cpu"))
    sync = gradient_sync(model, groups)
    batch = cfg.train.global_batch_size // world
    gen = torch.Generator().manual_seed(rank)

    def step():
        tokens = torch.randint(0, cfg.model.vocab_size, (batch, cfg.data.seq_len + 1), generator=gen)
        with autocast(cfg, torch.device("cpu")):  # as the trainer: bf16 compute under train.dtype=bf16
            logits, stats = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        sync.arm(last_micro_batch=True)
        (loss + sum(s.loss for s in stats)).backward()
        sync.finish()
        clip_gradients(model, global_grad_norm(model, groups), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps - 1):  # AdamW's state exists after the first
        step()
    between_steps = resident_bytes_after_trim(dist.barrier) - before
    peak = between_steps + step_peak_bytes(step, dist.barrier)
    held = sum(local_tensor(t).numel() * local_tensor(t).element_size()
               for p in model.parameters() for t in (p, *optimizer.state[p].values()))
    return {"held": held, "between": between_steps, "peak": peak,
            "tensor_peak": held + _peak_tensor_bytes_allocated(step)}


def _peak_tensor_bytes_allocated(step) -> int:
    """The most bytes of tensors ``step()`` had allocated at once beyond those alive before it:
    the CPU allocator's running total as the profiler reports it (the CPU analogue of
    ``torch.cuda.max_memory_allocated``; allocator and communication buffers are not tensors)."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as fh:
            events = json.load(fh)["traceEvents"]
    return max((e["args"].get("Total Allocated", 0) for e in events if e.get("name") == "[memory]"), default=0)


@contextmanager
def _heap(mode: str):
    """Spawned ranks inherit the environment: set glibc's mmap threshold for them (see above)."""
    saved = os.environ.get(MMAP_THRESHOLD)
    if mode == "return":
        os.environ[MMAP_THRESHOLD] = str(128 * 1024)
    else:
        os.environ.pop(MMAP_THRESHOLD, None)
    try:
        yield
    finally:
        os.environ.pop(MMAP_THRESHOLD, None)
        if saved is not None:
            os.environ[MMAP_THRESHOLD] = saved


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from ...train.plan import peak_bytes, state_bytes

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--world", type=int, action="append", choices=(2, 4), help="only these world sizes (repeatable)")
    parser.add_argument("--heap", choices=("return", "keep"), default="return",
                        help="return: freed blocks over 128 KiB go back to the kernel (RSS follows live memory); keep: glibc's default")
    parser.add_argument("overrides", nargs="*", help="key=value, after the benchmark's model")
    args = parser.parse_args(argv)
    layouts = [(world, MODEL + args.overrides + layout) for world, layout in LAYOUTS
               if not args.world or world in args.world]
    try:  # every layout's config, before any process starts
        configs = [validate(load_config(args.config, overrides), world) for world, overrides in layouts]
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"gatepro-plan vs real gloo ranks (CPU): {args.config} {' '.join(MODEL + args.overrides)}; "
          f"{args.steps} training steps; the largest rank; freed heap: {args.heap}")
    print(f"{'world':>5}  {'layout':<24}{'held MiB':>10}{'planned':>10}{'resident':>10}{'RSS peak':>10}"
          f"{'tensors':>10}{'planned':>10}{'vs RSS':>8}{'vs tensors':>11}")
    for (world, overrides), cfg in zip(layouts, configs):
        with _heap(args.heap):
            ranks = run_on_ranks(world, _worker, args.config, overrides, args.steps)
        # held: weights, their AdamW moments and step counters (gradients are freed after each step)
        states = [state_bytes(cfg, world, r) for r in range(world)]
        planned_held = [s.params + s.optimizer for s in states]
        planned_peak = [peak_bytes(cfg, world, s, cfg.train.activation_checkpointing) for s in states]
        worst = max(range(world), key=lambda r: ranks[r]["tensor_peak"])
        name = f"{'FSDP' if cfg.parallel.dp_shard else 'replicated'} ep={cfg.parallel.ep}"
        r = ranks[worst]
        print(f"{world:>5}  {name:<24}{r['held'] / 2**20:>10.1f}{planned_held[worst] / 2**20:>10.1f}"
              f"{r['between'] / 2**20:>10.1f}{r['peak'] / 2**20:>10.1f}{r['tensor_peak'] / 2**20:>10.1f}"
              f"{planned_peak[worst] / 2**20:>10.1f}{planned_peak[worst] / r['peak']:>8.2f}"
              f"{planned_peak[worst] / r['tensor_peak']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

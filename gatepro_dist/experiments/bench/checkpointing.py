"""Memory and time of a training step with train.activation_checkpointing none, moe and block.

    gatepro-bench checkpointing [--config configs/quickstart.yaml] [--batch 16] [--seq 512] [--ep 2]

On ``--ep`` gloo ranks (expert parallel, so the MoE layers' all-to-alls are recomputed in
backward), one model per mode built from the same config and seed, the same tokens. Per mode:
the bytes autograd keeps for backward in one forward (counted exactly: each storage once,
parameters left out), the resident memory a
forward+backward adds at its peak (VmHWM after minus VmRSS before, freed heap handed back first;
median of 3, the slowest rank), and its time (median of 5, the slowest rank). Ratios are against
``none``, measured side by side in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from ...cluster.spawn import run_on_ranks
from ...config import load_config
from ...config_checks import validate
from .rounds import peak_memory_in_rounds

MODES = ("none", "moe", "block")
MEMORY_ROUNDS, TIME_ROUNDS = 3, 5


def saved_activation_bytes(model: torch.nn.Module, forward) -> tuple[int, object]:
    """Bytes of the tensors autograd keeps for backward while ``forward()`` runs, each storage
    counted once and the model's parameters left out (they are kept anyway). Returns the bytes
    and what ``forward`` returned."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    return sum(storages.values()), out


def _worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    from ...train.model import Transformer
    from ...train.parallel import build_parallel_groups

    groups = build_parallel_groups(args.ep)
    gen = torch.Generator().manual_seed(rank)
    results = {}
    for mode in MODES:
        cfg = validate(load_config(args.config, [f"parallel.ep={args.ep}", f"train.activation_checkpointing={mode}",
                                                 f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}"]), world)
        model = Transformer(cfg, groups.ep_group, groups.edp_group)
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq), generator=gen)

        def loss_of_forward():
            logits, stats = model(tokens)
            return logits.float().square().mean() + sum(s.loss for s in stats)

        def step():
            model.zero_grad(set_to_none=True)
            loss_of_forward().backward()

        saved, loss = saved_activation_bytes(model, loss_of_forward)
        loss.backward()
        peak = peak_memory_in_rounds({mode: step}, MEMORY_ROUNDS, dist.barrier)[mode]
        times = []
        for _ in range(TIME_ROUNDS):
            dist.barrier()
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
        results[mode] = {"saved": saved, "peak": peak, "time": statistics.median(times)}
    return results


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--batch", type=int, default=16, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--ep", type=int, default=2, help="ranks (all expert parallel)")
    args = parser.parse_args(argv)
    per_rank = run_on_ranks(args.ep, _worker, args)
    worst = {mode: {key: max(r[mode][key] or 0 for r in per_rank) for key in ("saved", "peak", "time")}
             for mode in MODES}
    print(f"activation checkpointing: {args.config}, {args.batch} x {args.seq} tokens per rank, ep={args.ep} "
          f"(gloo, CPU); the slowest/largest rank")
    print(f"{'mode':<8}{'saved MiB':>11}{'peak MiB':>10}{'step s':>9}{'saved vs none':>15}{'peak vs none':>14}"
          f"{'time vs none':>14}")
    base = worst["none"]
    for mode in MODES:
        w = worst[mode]
        print(f"{mode:<8}{w['saved'] / 2**20:>11.1f}{w['peak'] / 2**20:>10.1f}{w['time']:>9.3f}"
              f"{w['saved'] / base['saved']:>15.2f}{w['peak'] / max(base['peak'], 1):>14.2f}"
              f"{w['time'] / base['time']:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

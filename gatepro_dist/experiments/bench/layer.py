"""fwd+bwd time of one MoE layer: plain top-k vs GatePro, grouped GEMM vs per-expert loop, or ours vs DeepSpeed-MoE.

    gatepro-bench layer [--tokens 8192 --hidden 512 --ffn 1024 --experts 8,16,64
                         --top-k 2 --ep 1,2 --repeats 15 --quick] [--compare deepspeed]
    (the same as python -m gatepro_dist.experiments.bench.layer ...)

Every ep runs in its own freshly spawned processes (gloo on 127.0.0.1 when ep > 1), each with
cores/ep threads and, when there are enough cores, pinned to its own cores. Inside a run all
variants share one layer per expert count (GatePro and the GEMM path are switched by attribute,
so the weights and the tokens are the same) and are timed in interleaved rounds, the order
rotating each round, so a noisy neighbour slows every variant alike. Each measurement is one
step: forward, then backward of (output . fixed upstream gradient + the layer's aux losses).
With ep > 1 a step is timed from a barrier and counts as the slowest rank's time.

Allocator: by default the ranks run with glibc's malloc told to keep freed memory for reuse
(``--malloc heap``: GLIBC_TUNABLES mmap_max=0, no trimming). With glibc's defaults every
tensor over 32 MiB is a fresh mmap, so each step page-faults (and the kernel zeroes) its
activations again: ~0.9 GB per step here, 15-20% of the layer's CPU time. ``--malloc default``
measures that.

``--compare deepspeed`` times DeepSpeed-MoE beside our layer at one expert count instead, with
the same machinery; ``vs_deepspeed.py`` describes what is compared, the capacity settings, the
peak-memory method and ``speedup_vs_deepspeed``.

The FLOP floor: the experts' GEMMs (fwd+bwd = 3 x 2 x tokens x k x 3 x d x ffn per rank) timed
in the same rounds as plain fp32 `torch.mm` calls into preallocated outputs, one expert's shape
at a time, with nothing else: "% of FLOP floor" = floor time / layer time.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from ...moe.layer import MoELayer, MoESpec
from . import vs_deepspeed
from .rounds import (COLUMNS_LINE, HEADER, BenchConfig, Variant, dense_gemm_step, floor_lines, floor_name, format_row,
                     join_ep, layer_step, paired_ratio, run_ep, run_line, slowest_rank, time_in_rounds)


def variants_of(cfg: BenchConfig) -> list[Variant]:
    return [Variant(n, gatepro, grouped) for n in cfg.experts
            for grouped in (True, False) for gatepro in (False, True)]


def _rank_main(rank: int, ep: int, cfg: BenchConfig, init_file: str, result_file: str) -> None:
    ep_group, barrier, threads = join_ep(rank, ep, cfg, init_file)
    gen = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(cfg.tokens, cfg.hidden, generator=gen).requires_grad_()
    grad_TD = torch.randn(cfg.tokens, cfg.hidden, generator=gen)
    steps = {}
    for n in cfg.experts:
        spec = MoESpec(hidden_size=cfg.hidden, num_experts=n, top_k=cfg.top_k, expert_ffn_dim=cfg.ffn)
        layer = MoELayer(spec, ep_group)
        steps[floor_name(n)] = dense_gemm_step(cfg, n // ep, cfg.tokens * cfg.top_k * ep // n)
        for variant in variants_of(cfg):
            if variant.num_experts == n:
                steps[variant.name] = layer_step(layer, variant, x_TD, grad_TD)
    times = slowest_rank(time_in_rounds(steps, cfg.repeats, cfg.warmup, barrier), ep_group)
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump({"threads": threads, "times": times}, f)


def report(cfg: BenchConfig, results: dict[int, dict]) -> str:
    lines = [run_line(cfg), COLUMNS_LINE, HEADER]
    for ep, result in results.items():
        times = result["times"]
        for variant in variants_of(cfg):
            lines.append(format_row(f"ep={ep} {variant.name}", cfg.tokens * ep, times[variant.name],
                                    times[floor_name(variant.num_experts)]))
    lines.append("")
    lines.append("GatePro overhead vs plain top-k, same config (median of per-round ratios, wall / cpu):")
    for ep, result in results.items():
        times = result["times"]
        for n in cfg.experts:
            for grouped in (True, False):
                plain, gatepro = times[Variant(n, False, grouped).name], times[Variant(n, True, grouped).name]
                wall, cpu = (paired_ratio(gatepro[c], plain[c]) for c in ("wall", "cpu"))
                lines.append(f"  GatePro overhead ep={ep} N={n:<3} {'grouped' if grouped else 'loop':<8}"
                             f"{100 * (wall - 1):+6.1f}% wall {100 * (cpu - 1):+6.1f}% cpu")
    lines.append("Grouped GEMM speedup over the per-expert loop (median of per-round ratios, wall / cpu):")
    for ep, result in results.items():
        times = result["times"]
        for n in cfg.experts:
            for gatepro in (False, True):
                loop, grouped = times[Variant(n, gatepro, False).name], times[Variant(n, gatepro, True).name]
                wall, cpu = (paired_ratio(loop[c], grouped[c]) for c in ("wall", "cpu"))
                lines.append(f"  grouped vs loop ep={ep} N={n:<3} {'gatepro' if gatepro else 'plain':<8}"
                             f"{wall:6.2f}x wall {cpu:6.2f}x cpu")
    lines.extend(floor_lines(cfg, results))
    return "\n".join(lines)


def parse_args(argv: list[str] | None, prog: str | None = None) -> BenchConfig:
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=ints, default=None,
                        help="comma-separated, e.g. 8,64 (default 8,16,64; one value with --compare, default 16)")
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ep", type=ints, default=(1, 2), help="comma-separated, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--malloc", choices=("heap", "default"), default="heap",
                        help="heap: glibc keeps freed memory (no per-step page faults); default: glibc as is")
    parser.add_argument("--threads", type=int, default=None, help="threads per rank (default: cores / ep)")
    parser.add_argument("--compare", choices=("deepspeed",), default=None,
                        help="deepspeed: time DeepSpeed-MoE beside our layer (plain top-k and GatePro)")
    parser.add_argument("--quick", action="store_true", help="a tiny run that finishes in seconds (for tests)")
    args = parser.parse_args(argv)
    if args.compare and args.experts and len(args.experts) != 1:
        parser.error(f"--compare {args.compare} takes one --experts value, got {len(args.experts)}")
    if args.quick:  # one thread: tiny ops on two threads stall on any other load on the machine
        return BenchConfig(tokens=256, hidden=32, ffn=64, experts=(16,) if args.compare else (8, 16),
                           top_k=args.top_k, eps=args.ep, repeats=3, warmup=1, malloc=args.malloc, threads=1,
                           compare=args.compare)
    experts = args.experts or ((16,) if args.compare else (8, 16, 64))
    for n in experts:
        for ep in args.ep:
            if n % ep or (args.tokens * args.top_k * ep) % n:
                parser.error(f"--experts {n} must divide evenly by ep={ep} and into tokens*top_k*ep rows")
    return BenchConfig(args.tokens, args.hidden, args.ffn, experts, args.top_k, args.ep,
                       args.repeats, args.warmup, args.malloc, args.threads, args.compare)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    cfg = parse_args(argv, prog)
    rank_main, report_of = _rank_main, report
    if cfg.compare == "deepspeed":
        problem = vs_deepspeed.deepspeed_problem()
        if problem:
            print(f"{prog or 'gatepro_dist.experiments.bench.layer'}: error: {problem}", file=sys.stderr)
            return 2
        rank_main, report_of = vs_deepspeed.rank_main, vs_deepspeed.report
    print(json.dumps({"bench": "layer", **asdict(cfg)}), flush=True)
    results = {ep: run_ep(cfg, ep, rank_main) for ep in cfg.eps}
    print(report_of(cfg, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

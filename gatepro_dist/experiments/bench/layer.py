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
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ...moe.layer import MoELayer, MoESpec

HEADER = (f"{'config':<30}{'wall ms':>10}{'p10-p90':>14}{'tokens/s':>10}{'% floor':>10}"
          f"{'cpu ms':>10}{'% floor':>10}")


@dataclass(frozen=True)
class BenchConfig:
    tokens: int = 8192  # per rank
    hidden: int = 512
    ffn: int = 1024
    experts: tuple[int, ...] = (8, 16, 64)
    top_k: int = 2
    eps: tuple[int, ...] = (1, 2)
    repeats: int = 15
    warmup: int = 2
    malloc: str = "heap"
    threads: int | None = None  # per rank; None: this machine's cores / ep
    compare: str | None = None  # "deepspeed": our layer beside DeepSpeed-MoE (vs_deepspeed.py)

    def threads_per_rank(self, ep: int) -> int:
        return self.threads or max(1, len(os.sched_getaffinity(0)) // ep)

    def gemm_flops(self) -> int:
        """Expert GEMM FLOPs of one rank's step: 3 (fwd, dgrad, wgrad) x 2 x rows x 3 matrices x d x ffn."""
        return 3 * 2 * self.tokens * self.top_k * 3 * self.hidden * self.ffn


@dataclass(frozen=True)
class Variant:
    num_experts: int
    gatepro: bool
    grouped: bool

    @property
    def name(self) -> str:
        return (f"N={self.num_experts:<3} {'gatepro' if self.gatepro else 'plain':<8}"
                f"{'grouped' if self.grouped else 'loop'}")


def variants_of(cfg: BenchConfig) -> list[Variant]:
    return [Variant(n, gatepro, grouped) for n in cfg.experts
            for grouped in (True, False) for gatepro in (False, True)]


def floor_name(num_experts: int) -> str:
    return f"N={num_experts:<3} dense GEMM floor"


# ----------------------------------------------------------------------------- what one rank times


def layer_step(layer: MoELayer, variant: Variant, x_TD: torch.Tensor, grad_TD: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        layer.router.gatepro_enabled = variant.gatepro
        layer.experts.grouped_gemm = variant.grouped
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        out_TD, stats = layer(x_TD)
        torch.autograd.backward([out_TD, stats.loss], [grad_TD, torch.ones_like(stats.loss)])
    return step


def dense_gemm_step(cfg: BenchConfig, num_local_experts: int, rows_per_expert: int) -> Callable[[], None]:
    """The six GEMMs of the local experts' SwiGLU fwd+bwd, one expert at a time, nothing else."""
    m, d, f, e = rows_per_expert, cfg.hidden, cfg.ffn, num_local_experts
    gate_up_EDF2, down_EFD = torch.randn(e, d, 2 * f) * 0.02, torch.randn(e, f, d) * 0.02
    grad_gate_up_EDF2, grad_down_EFD = torch.empty_like(gate_up_EDF2), torch.empty_like(down_EFD)
    x, h, a, y = torch.randn(e, m, d), torch.empty(e, m, 2 * f), torch.randn(e, m, f), torch.empty(e, m, d)
    dy, da, dh, dx = torch.randn(e, m, d), torch.empty(e, m, f), torch.randn(e, m, 2 * f), torch.empty(e, m, d)

    def step() -> None:
        for i in range(e):
            torch.mm(x[i], gate_up_EDF2[i], out=h[i])  # forward
            torch.mm(a[i], down_EFD[i], out=y[i])
            torch.mm(dy[i], down_EFD[i].t(), out=da[i])  # backward: data gradients
            torch.mm(dh[i], gate_up_EDF2[i].t(), out=dx[i])
            torch.mm(a[i].t(), dy[i], out=grad_down_EFD[i])  # backward: weight gradients
            torch.mm(x[i].t(), dh[i], out=grad_gate_up_EDF2[i])
    return step


def rotated(names: list[str], round_: int) -> list[str]:
    """The order of round ``round_``: each name goes first in turn, so none always follows another."""
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def time_in_rounds(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                   barrier: Callable[[], None]) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call of each step; every step once per round, the order rotating."""
    names = list(steps)
    times = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in range(warmup + repeats):
        for name in rotated(names, round_):
            barrier()
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if round_ >= warmup:
                times[name]["wall"].append(wall)
                times[name]["cpu"].append(cpu)
    return times


def join_ep(rank: int, ep: int, cfg: BenchConfig, init_file: str, process_group: bool = False):
    """Set this rank's threads (and cores); join the gloo group when ep > 1 or ``process_group``.

    Returns ``(ep_group, barrier, threads)``; ``ep_group`` is None at ep=1, as for a layer that
    holds every expert.
    """
    threads = cfg.threads_per_rank(ep)
    torch.set_num_threads(threads)
    cores = sorted(os.sched_getaffinity(0))
    if ep > 1 and len(cores) >= ep * threads:  # one rank per core (block of cores)
        os.sched_setaffinity(0, cores[rank * threads : (rank + 1) * threads])
    if ep > 1 or process_group:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ep)
    if ep == 1:
        return None, (lambda: None), threads
    ep_group = dist.new_group(list(range(ep)))
    return ep_group, (lambda: dist.barrier(ep_group)), threads


def slowest_rank(times: dict[str, dict[str, list[float]]], ep_group) -> dict[str, dict[str, list[float]]]:
    """Each round's time as the slowest rank's: a step takes as long as its slowest rank."""
    if ep_group is None:
        return times
    every_rank = [None] * dist.get_world_size(ep_group)
    dist.all_gather_object(every_rank, times, group=ep_group)
    return {name: {clock: [max(ts) for ts in zip(*(r[name][clock] for r in every_rank))]
                   for clock in ("wall", "cpu")} for name in times}


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


# Keep freed heap memory for the next step instead of returning it to the kernel (no mmap, no trim).
HEAP_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def run_ep(cfg: BenchConfig, ep: int, rank_main: Callable = _rank_main) -> dict:
    """Spawn ``ep`` fresh processes running ``rank_main``; return the summary rank 0 wrote."""
    saved = os.environ.get("GLIBC_TUNABLES")
    if cfg.malloc == "heap":  # read by glibc when the spawned interpreter starts
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [saved, HEAP_MALLOC_TUNABLES]))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            init_file, result_file = os.path.join(tmp, "rendezvous"), os.path.join(tmp, "result.json")
            mp.start_processes(rank_main, args=(ep, cfg, init_file, result_file), nprocs=ep,
                               join=True, start_method="spawn")
            with open(result_file) as f:
                return json.load(f)
    finally:
        if saved is None:
            os.environ.pop("GLIBC_TUNABLES", None)
        else:
            os.environ["GLIBC_TUNABLES"] = saved


# ----------------------------------------------------------------------------- the report


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a/b (both timed in the same round, so shared noise cancels)."""
    return statistics.median(x / y for x, y in zip(a, b))


def run_line(cfg: BenchConfig, what: str = "MoE layer fwd+bwd") -> str:
    return (f"{what}: {cfg.tokens} tokens/rank, d={cfg.hidden}, ffn={cfg.ffn}, top-{cfg.top_k}, "
            f"fp32, torch {torch.__version__}, {len(os.sched_getaffinity(0))} cores, "
            f"{cfg.repeats} interleaved repeats after {cfg.warmup} warm-up, malloc={cfg.malloc}, "
            f"load average now {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


COLUMNS_LINE = ("wall = time per step (slowest rank); cpu = CPU time the busiest rank's process used "
                "(less sensitive to other load on the machine; excludes waiting for the other rank); "
                "% floor = FLOP-floor time / layer time, median over rounds of the ratio within a round")


def format_row(label: str, tokens_per_step: int, times: dict[str, list[float]],
               floor: dict[str, list[float]]) -> str:
    """One line under HEADER: ``times`` and ``floor`` hold the per-round wall and cpu seconds."""
    wall, cpu = times["wall"], times["cpu"]
    med = statistics.median(wall)
    return (f"{label:<30}{med * 1e3:>10.1f}"
            f"{f'{percentile(wall, 0.1) * 1e3:.0f}-{percentile(wall, 0.9) * 1e3:.0f}':>14}"
            f"{tokens_per_step / med:>10.0f}{100 * paired_ratio(floor['wall'], wall):>9.1f}%"
            f"{statistics.median(cpu) * 1e3:>10.1f}{100 * paired_ratio(floor['cpu'], cpu):>9.1f}%")


def floor_lines(cfg: BenchConfig, results: dict[int, dict]) -> list[str]:
    gflop = cfg.gemm_flops() / 1e9
    lines = [f"FLOP floor: expert GEMMs fwd+bwd = 3x2x{cfg.tokens}x{cfg.top_k}x3x{cfg.hidden}x{cfg.ffn} "
             f"= {gflop:.2f} GFLOP per rank per step, timed as dense fp32 torch.mm at one expert's shape:"]
    for ep, result in results.items():
        for n in cfg.experts:
            floor = result["times"][floor_name(n)]
            wall, cpu = statistics.median(floor["wall"]), statistics.median(floor["cpu"])
            rows = cfg.tokens * cfg.top_k * ep // n
            lines.append(f"  ep={ep} N={n:<3} {n // ep} experts x [{rows}x{cfg.hidden}]@[{cfg.hidden}x{2 * cfg.ffn}] etc., "
                         f"{result['threads']} thread(s)/rank: {wall * 1e3:.1f} ms wall "
                         f"(p10 {percentile(floor['wall'], 0.1) * 1e3:.1f}) = {gflop / wall:.1f} GFLOP/s per rank; "
                         f"{cpu * 1e3:.1f} ms cpu")
    return lines


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
        from . import vs_deepspeed

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

"""The machinery of the layer benchmarks (``layer.py`` and ``vs_deepspeed.py`` build on it): what a run
is configured with, the step one rank times, interleaved rounds, the slowest rank, fresh processes
per ep, and the table rows. ``layer.py`` describes the method.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ...moe.layer import MoELayer

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


# Keep freed heap memory for the next step instead of returning it to the kernel (no mmap, no trim).
HEAP_MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def run_ep(cfg: BenchConfig, ep: int, rank_main: Callable) -> dict:
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


# ----------------------------------------------------------------------------- peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def resident_bytes_after_trim(barrier) -> int:
    """This process's resident memory once freed heap memory went back to the kernel (glibc's
    malloc_trim), so that it counts live memory only. Raises OSError/AttributeError where /proc
    or glibc cannot tell."""
    barrier()
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    return _status_kib("VmRSS") * 1024


def step_peak_bytes(step, barrier) -> int | None:
    """Resident memory ``step()`` adds at its peak; None where /proc or glibc cannot tell."""
    try:
        before = resident_bytes_after_trim(barrier)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except (OSError, AttributeError):
        step()  # the other ranks run it too: keep the collectives matched
        return None
    step()
    return _status_kib("VmHWM") * 1024 - before


def peak_memory_in_rounds(steps: dict, rounds: int, barrier) -> dict[str, int | None]:
    """The median over ``rounds`` of each step's ``step_peak_bytes``, the order rotating per round."""
    peaks = {name: [] for name in steps}
    for round_ in range(rounds):
        for name in rotated(list(steps), round_):
            peaks[name].append(step_peak_bytes(steps[name], barrier))
    return {name: None if None in values else int(statistics.median(values)) for name, values in peaks.items()}

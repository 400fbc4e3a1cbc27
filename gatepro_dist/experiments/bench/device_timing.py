"""Time steps on the device they run on: CUDA events on a GPU, the host clock on a CPU.

On a GPU, kernels launch asynchronously: the host clock around a step measures the launches, not the
work. CUDA events are recorded into the stream before and after each step and read once at the end,
so the loop itself never waits on the GPU. On a CPU every op has finished when it returns, and
``time.perf_counter`` is the clock (that is what the tests exercise).

Steps are timed in interleaved rounds, the order rotating each round (as ``rounds.py`` does), so a
clock change or a neighbour slows every variant alike. ``step_peak_memory`` measures one call's peak
memory on its own, outside the timed rounds.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .rounds import percentile, rotated


class _HostClock:
    """The CPU fallback: perf_counter readings, in the interface of a pair of CUDA events."""

    def __init__(self):
        self.at = None

    def record(self) -> None:
        self.at = time.perf_counter()

    def elapsed_time(self, end: _HostClock) -> float:
        return (end.at - self.at) * 1e3


def _marker(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.Event(enable_timing=True)
    return _HostClock()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps_ms(steps: dict[str, Callable[[], None]], repeats: int, warmup: int,
                  device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each call of each step after ``warmup`` untimed rounds, ``repeats`` timed ones."""
    names = list(steps)
    marks: dict[str, list] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        for name in rotated(names, round_):
            start, end = _marker(device), _marker(device)
            start.record()
            steps[name]()
            end.record()
            if round_ >= warmup:
                marks[name].append((start, end))
        if round_ == warmup - 1:
            _synchronize(device)  # warm-up done (allocator, autotuning) before the first timed round
    _synchronize(device)  # every recorded event has happened: reading them does not block
    return {name: [start.elapsed_time(end) for start, end in pairs] for name, pairs in marks.items()}


def summary(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": statistics.median(times_ms), "p10_ms": percentile(times_ms, 0.1),
            "p90_ms": percentile(times_ms, 0.9)}


def step_peak_memory(step: Callable[[], None], device: torch.device) -> dict[str, float] | None:
    """One call of ``step`` on a CUDA device: the most memory allocated during it
    (``torch.cuda.max_memory_allocated``, MiB) and how much of that the step itself added over what
    was allocated before it (its activations, gradients and workspaces). None elsewhere: the CPU
    allocator keeps no such statistics."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_mib": peak / 2**20, "step_peak_mib": (peak - before) / 2**20}

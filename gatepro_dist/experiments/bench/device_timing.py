"""Time steps on the device they run on: CUDA events on a GPU, the host clock on a CPU.

On a GPU, kernels launch asynchronously: the host clock around a step measures the launches, not the
work. CUDA events are recorded into the stream before and after each step and read once at the end,
so the loop itself never waits on the GPU. On a CPU every op has finished when it returns, and
``time.perf_counter`` is the clock (that is what the tests exercise).

Steps are timed in interleaved rounds, the order rotating each round (as ``rounds.py`` does), so a
clock change or a neighbour slows every variant alike.
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

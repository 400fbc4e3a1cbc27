"""Sections that test the orchestration itself (tests/test_gpu_bench.py): they need no torch and no
GPU and are never among ``gpu.SECTIONS``; tests pass them to ``gpu_run.run_sections`` directly."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def quick(options: dict, note) -> dict:
    return {"answer": options.get("answer", 42), "passed": True}


def hang(options: dict, note) -> dict:
    """Notes its process id, then sleeps far past any timeout a test gives it."""
    note("pid", os.getpid())
    print(f"pid {os.getpid()}", flush=True)
    time.sleep(options.get("seconds", 3600))
    return {"passed": True}


def read_report(options: dict, note) -> dict:
    """The statuses of the report on disk when this section starts (what a reader would see)."""
    report = json.loads((Path(options["out"]) / "gpu_report.json").read_text())
    return {"seen": {name: body["status"] for name, body in report["sections"].items()}, "passed": True}


def crash(options: dict, note) -> dict:
    os._exit(7)  # dies without a result, as a segfault or a CUDA abort would

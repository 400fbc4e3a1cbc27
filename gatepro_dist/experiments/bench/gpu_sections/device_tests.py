"""Section ``tests``: the device-aware test files with ``GATEPRO_TEST_DEVICE=cuda`` (the variable those
tests read; tests/test_bf16.py): the expert GEMMs' operands on CUDA (bf16, int32 offsets, 16-byte
rows, 6 ``_grouped_mm`` calls per layer fwd+bwd), the router's fp32 guard, bf16 training numerics.
Run from the repository root (it needs tests/) with pytest installed; cut at the section's deadline."""
from __future__ import annotations

import os
import subprocess
import sys
import time

TESTS = ("tests/test_bf16.py", "tests/test_routing.py")


def device_tests(options: dict, note) -> dict:
    missing = [path for path in TESTS if not os.path.isfile(path)]
    if missing:
        return {"passed": False, "error": f"{missing[0]} not found: run from the repository root"}
    try:
        import pytest  # noqa: F401  (only: are they installed? tests/conftest.py needs both)
        import pytest_timeout  # noqa: F401
    except ImportError:
        return {"passed": False, "error": "pytest or pytest-timeout is not installed: carry their wheels "
                                          "(docs/gpu_acceptance.md)"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    env = {**os.environ, "GATEPRO_TEST_DEVICE": "cuda"}
    began = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=max(options["deadline"] - time.time() - 5, 1))
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return {"passed": False, "error": "pytest did not finish before the section's deadline", "output_tail": out[-3000:]}
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"command": " ".join(["GATEPRO_TEST_DEVICE=cuda", "python", *command[1:]]), "returncode": done.returncode,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - began, 1),
            "output_tail": "\n".join(lines[-30:]) if done.returncode else "", "passed": done.returncode == 0}

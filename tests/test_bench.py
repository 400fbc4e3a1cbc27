"""The layer benchmark runs end to end (tiny sizes, ep=1 and a real 2-process gloo group)."""
from __future__ import annotations

import subprocess
import sys

from gatepro_dist.bench.layer import HEADER


def test_layer_benchmark_quick_prints_the_table_and_the_gatepro_overhead():
    done = subprocess.run(
        [sys.executable, "-m", "gatepro_dist.bench.layer", "--quick"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert HEADER in lines
    assert any(line.strip().startswith("GatePro overhead ep=1 N=16") for line in lines)
    assert any(line.strip().startswith("GatePro overhead ep=2 N=16") for line in lines)
    assert any("FLOP floor" in line for line in lines)
    rows = [line for line in lines if line.startswith(("ep=1 N=", "ep=2 N="))]
    assert len(rows) == 2 * 2 * 4  # ep x N x (plain, GatePro) x (grouped, loop)

"""The benchmarks run end to end (tiny sizes, ep=1 and a real 2-process gloo group); timings are never asserted."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gatepro_dist.experiments.bench.layer import HEADER
from gatepro_dist.experiments.bench.vs_deepspeed import HEADER as VS_DEEPSPEED_HEADER


def gatepro_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    script = shutil.which("gatepro-bench")
    assert script is not None, "pip install -e . registers gatepro-bench (pyproject [project.scripts])"
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout)


def test_layer_benchmark_quick_prints_the_table_and_the_gatepro_overhead():
    done = subprocess.run(
        [sys.executable, "-m", "gatepro_dist.experiments.bench.layer", "--quick"],
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


def test_layer_vs_deepspeed_quick_prints_both_sides_and_ends_with_the_speedup():
    # ep=2 only (the former ep=1,2 ran DeepSpeed-MoE a second time): the all-to-all on both sides.
    # Given up: the ep=1 rows of this table (DeepSpeed's MoE at ep_size=1 runs in test_deepspeed_gate).
    done = gatepro_bench("layer", "--compare", "deepspeed", "--quick", "--ep", "2")
    assert done.returncode == 0, done.stderr[-3000:]  # tests/run.sh installs DeepSpeed: no skip
    lines = done.stdout.splitlines()
    assert VS_DEEPSPEED_HEADER in lines
    for ep in (2,):
        for row in ("ours plain top-k", "ours GatePro", "DeepSpeed top-k"):
            assert any(line.startswith(f"ep={ep} {row} ") for line in lines), (ep, row, done.stdout)
        assert any(line.strip().startswith(f"ep={ep} C=") for line in lines)  # DeepSpeed's padded capacity
    assert any(line.startswith("capacity: ours dropless") and "drop_tokens=False" in line for line in lines)
    assert any("FLOP floor" in line for line in lines)
    assert re.fullmatch(r"speedup_vs_deepspeed=\d+\.\d+", lines[-1]), lines[-1]


def test_layer_vs_deepspeed_without_deepspeed_exits_2_with_the_fix_before_any_work():
    # sys.modules[name] = None makes `import deepspeed` fail as if it were not installed.
    code = ("import sys; sys.modules['deepspeed'] = None\n"
            "from gatepro_dist.experiments.bench.cli import main\n"
            "sys.exit(main(['layer', '--compare', 'deepspeed']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""  # nothing ran
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("gatepro-bench layer: error: --compare deepspeed needs DeepSpeed")
    assert "GATEPRO_WITH=deepspeed bash launch/install.sh" in line and "docs/deepspeed.md" in line


def test_comm_benchmark_through_gatepro_bench_counts_what_the_model_predicts():
    done = gatepro_bench("comm", "--ep", "2", "--experts", "4", "--hidden", "16", "--tokens", "64")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1] == "predicted_equals_counted=True"


def test_gatepro_bench_names_its_subcommands_and_refuses_an_unknown_one():
    assert "layer,throughput,comm" in gatepro_bench("--help").stdout
    # The training-throughput benchmark trains five real models (minutes here): only its options are checked.
    throughput = gatepro_bench("throughput", "--help")
    assert throughput.returncode == 0 and throughput.stdout.startswith("usage: gatepro-bench throughput")
    done = gatepro_bench("nonsense")
    assert done.returncode == 2 and "invalid choice: 'nonsense'" in done.stderr


def test_plan_benchmark_holds_what_gatepro_plan_predicts():
    """Real ranks (world 2, replicated and FSDP, a tiny model): the held column equals the plan's;
    the peaks are measured and printed, their values never asserted."""
    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    done = gatepro_bench("plan", "--config", config, "--world", "2", "--steps", "2", "model.d_model=32", "model.n_heads=2",
                         "moe.expert_ffn_dim=32", "data.seq_len=32", "model.max_seq_len=32")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.lstrip().startswith("2 ")]
    assert [row[1] for row in rows] == ["replicated", "FSDP"]
    for row in rows:
        held, planned_held, rss_peak, tensor_peak = float(row[3]), float(row[4]), float(row[6]), float(row[7])
        assert held == planned_held and rss_peak > 0 and tensor_peak > held


def test_plan_benchmark_sets_glibcs_heap_mode_for_its_ranks_only(monkeypatch):
    """--heap return: the spawned ranks inherit a 128 KiB mmap threshold (freed blocks go back to
    the kernel); --heap keep: glibc's default. The caller's environment is restored either way."""
    from gatepro_dist.experiments.bench.plan import MMAP_THRESHOLD, _heap

    monkeypatch.setenv(MMAP_THRESHOLD, "999")
    with _heap("return"):
        assert os.environ[MMAP_THRESHOLD] == str(128 * 1024)
    assert os.environ[MMAP_THRESHOLD] == "999"
    with _heap("keep"):
        assert MMAP_THRESHOLD not in os.environ
    assert os.environ[MMAP_THRESHOLD] == "999"

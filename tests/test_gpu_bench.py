"""The GPU acceptance command's CPU-runnable parts: its options, the refusal without CUDA, the FLOP
arithmetic, the device timer's CPU clock and the report written from a results dict. The GPU parts
themselves run only on a GPU (docs/benchmarks.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gatepro_dist.experiments.bench.device_timing import summary, time_steps_ms
from gatepro_dist.experiments.bench.gpu import bf16_layer_check, parse_args, time_layers, train_quickstart
from gatepro_dist.experiments.bench.gpu_report import (dense_shapes, expert_gemm_flops, passed, timing_row,
                                                       write_report)


def test_gpu_command_without_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path):
    code = "import sys; from gatepro_dist.experiments.bench.cli import main; sys.exit(main(['gpu']))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, also on a GPU machine
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("gatepro-bench gpu: error: needs a CUDA GPU, and torch ") and "docs/benchmarks.md" in line
    assert list(tmp_path.iterdir()) == []


def test_gpu_options_default_to_the_acceptance_run_and_refuse_what_cannot_run(capsys):
    args = parse_args([])
    assert (args.steps, args.tokens, args.hidden, args.ffn, args.experts, args.top_k) == (30, 16384, 1024, 2048, 16, 2)
    assert args.skip == () and args.config == "configs/quickstart.yaml"
    assert parse_args(["--skip", "tests,megatron"]).skip == ("tests", "megatron")
    for bad, message in ((["--skip", "lunch"], "--skip lunch: not a section"),
                         (["--ffn", "1004"], "--ffn 1004 is not a multiple of 8")):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad, prog="gatepro-bench gpu")
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_expert_flops_and_the_dense_matmul_doing_the_same_work():
    flops = expert_gemm_flops(tokens=8192, top_k=2, hidden=512, ffn=1024)
    assert flops == 3 * 2 * (8192 * 2) * 512 * (3 * 1024)  # fwd + dgrad + wgrad; gate, up, down
    m, k, n = dense_shapes(8192, 2, 512, 1024)
    assert 3 * 2 * m * k * n == flops


def test_timing_row_reports_tflops_at_the_median_and_the_fraction_of_dense():
    row = timing_row("ours", {"median_ms": 4.0, "p10_ms": 3.0, "p90_ms": 5.0}, flops=2 * 10**12, dense_median_ms=3.0)
    assert row["tflops"] == pytest.approx(500.0) and row["fraction_of_dense"] == pytest.approx(0.75)
    assert "fraction_of_dense" not in timing_row("dense", {"median_ms": 1.0}, 10**12, None)


def test_device_timer_on_the_cpu_clock_times_every_round_after_warmup():
    calls = []
    steps = {"a": lambda: calls.append("a"), "nap": lambda: (calls.append("nap"), time.sleep(0.003))}
    times = time_steps_ms(steps, repeats=4, warmup=2, device=torch.device("cpu"))
    assert calls.count("a") == calls.count("nap") == 6
    assert calls[:4] == ["a", "nap", "nap", "a"]  # the order rotates each round
    assert [len(times["a"]), len(times["nap"])] == [4, 4]
    assert min(times["nap"]) >= 3.0  # milliseconds: a sleep lasts at least what it was asked
    assert summary([1.0, 2.0, 3.0])["median_ms"] == 2.0


RESULTS = {
    "env": {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "megatron_core": None},
    "tests": {"summary": "20 passed", "passed": True},
    "train": {"first_loss": 5.55, "last_loss": 3.1, "passed": True},
    "layer": {"config": {"tokens": 16384, "hidden": 1024, "ffn": 2048, "experts": 16, "top_k": 2, "repeats": 20},
              "gflop": 1236.9, "passed": True,
              "rows": [timing_row("dense bf16 matmul, same FLOPs", {"median_ms": 2.0, "p10_ms": 1.9, "p90_ms": 2.1},
                                  1236950581248, 2.0),
                       timing_row("ours, grouped GEMM (bf16 autocast)", {"median_ms": 5.0, "p10_ms": 4.8, "p90_ms": 5.5},
                                  1236950581248, 2.0)]},
    "megatron_check": {"skipped": "megatron-core is not installed"},
}


def test_report_files_from_a_results_dict(tmp_path):
    json_path, md_path = write_report(RESULTS, tmp_path / "report")
    written = json.loads(json_path.read_text())
    assert written["passed"] is True and written["layer"]["rows"][1]["tflops"] == pytest.approx(247.39, abs=0.01)
    md = md_path.read_text()
    assert "**PASSED**" in md and "## megatron_check: skipped" in md
    assert "| ours, grouped GEMM (bf16 autocast) | 5.000 | 4.800-5.500 | 247.4 | 40% |" in md
    failed = {**RESULTS, "train": {"passed": False, "error": "RuntimeError: NCCL"}}
    assert not passed(failed)
    write_report(failed, tmp_path / "failed")
    assert "## train: FAILED" in (tmp_path / "failed" / "gpu_report.md").read_text()
    assert not passed({"megatron_check": {"skipped": "not installed"}})  # nothing ran: not a pass


def test_gatepro_bench_lists_the_gpu_subcommand():
    done = subprocess.run([sys.executable, "-m", "gatepro_dist.experiments.bench.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "gpu" in done.stdout and "GPU acceptance" in done.stdout


# The sections themselves are written for CUDA but take the device: on the CPU, at tiny sizes, they run end to end.

def test_layer_check_section_on_the_cpu_sees_bf16_grouped_gemms_within_bf16_rounding_of_fp32():
    result = bf16_layer_check(torch.device("cpu"), tokens=256)
    assert result["grouped_mm_calls"] == 6 and result["bf16_operands"] and result["passed"], result
    assert 1e-4 < max(result["relative_errors"].values()) < 2e-2  # bf16, not fp32; within bf16 rounding


def test_layer_timing_section_on_the_cpu_times_ours_beside_the_dense_matmul():
    args = parse_args(["--tokens", "256", "--hidden", "32", "--ffn", "64", "--experts", "8", "--repeats", "2"])
    result = time_layers(args, torch.device("cpu"), megatron=False)
    names = [row["name"] for row in result["rows"]]
    assert names == ["dense bf16 matmul, same FLOPs", "ours, grouped GEMM (bf16 autocast)"]
    assert result["gflop"] == expert_gemm_flops(256, 2, 32, 64) / 1e9
    assert all(row["tflops"] > 0 and row["p10_ms"] <= row["median_ms"] <= row["p90_ms"] for row in result["rows"])


def test_train_section_on_the_cpu_trains_in_bf16_until_the_loss_falls(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, max_seq_len: 64}\n"
                      "moe: {num_experts: 8, expert_ffn_dim: 32}\ndata: {seq_len: 32, max_bytes: 300000}\n"
                      "train: {global_batch_size: 8, lr: 3.0e-3, warmup_steps: 2}\n")
    result = train_quickstart(str(config), 6, torch.device("cpu"), tmp_path / "out")
    assert result["steps"] == 6 and result["last_loss"] < result["first_loss"] and result["passed"]
    assert (tmp_path / "out" / "train" / "config.yaml").read_text().count("dtype: bf16") == 1

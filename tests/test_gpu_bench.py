"""`gatepro-bench gpu` on the CPU: the orchestration with real child processes (a hanging section is
cut at its timeout, the report is valid after every section, the budget stops new sections, CUDA
sections say "needs CUDA" and run nothing), its options, its report, and the sections' checks
themselves at tiny sizes on the CPU (they take a device; the sections insist on CUDA).
docs/gpu_acceptance.md says what a GPU run must still confirm."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gatepro_dist.experiments.bench import gpu
from gatepro_dist.experiments.bench.device_timing import step_peak_memory, summary, time_steps_ms
from gatepro_dist.experiments.bench.gpu_report import (dense_shapes, expert_gemm_flops, markdown, timing_row,
                                                       verdict, write_report)
from gatepro_dist.experiments.bench.gpu_run import GRACE_S, Section, run_sections
from gatepro_dist.experiments.bench.gpu_sections.collectives import check_collectives
from gatepro_dist.experiments.bench.gpu_sections.numerics import compare_case
from gatepro_dist.experiments.bench.gpu_sections.timing import time_rows
from gatepro_dist.experiments.bench.gpu_sections.training import compare_resume, resume_check, train_phase

SELFTEST = "gatepro_dist.experiments.bench.gpu_sections.selftest:"


def selftest(name: str, function: str, timeout_s: float, **options) -> Section:
    return Section(name, SELFTEST + function, timeout_s, needs_cuda=False, options=options)


def test_gpu_command_without_cuda_exits_2_with_one_line_and_writes_nothing(tmp_path):
    code = "import sys; from gatepro_dist.experiments.bench.cli import main; sys.exit(main(['gpu']))"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, also on a GPU machine
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("gatepro-bench gpu: error: needs a CUDA GPU, and torch ") and "docs/gpu_acceptance.md" in line
    assert list(tmp_path.iterdir()) == []


def test_a_hanging_section_is_cut_at_its_timeout_and_every_other_section_is_still_reported(tmp_path):
    out = tmp_path / "report"
    sections = [selftest("first", "quick", 30, answer=7), selftest("hangs", "hang", 2.0),
                selftest("reads_report", "read_report", 30), selftest("crashes", "crash", 30)]
    began = time.monotonic()
    report = run_sections(sections, out, budget_s=60, options={"out": str(out)}, min_start_s=1)
    assert time.monotonic() - began < 2.0 + GRACE_S + 20
    states = {name: body["status"] for name, body in report["sections"].items()}
    assert states == {"first": "passed", "hangs": "timeout", "reads_report": "passed", "crashes": "failed"}
    hang = report["sections"]["hangs"]
    assert 2.0 <= hang["elapsed_s"] < 2.0 + GRACE_S + 1 and hang["cut_by"] == "section timeout"
    pid = hang["partial"]["pid"]  # noted before it slept: what it found survives the cut
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # and the hanging process is gone
    assert report["sections"]["first"]["answer"] == 7
    # The report on disk, as the section after the hang read it: valid JSON, the hang already recorded.
    assert report["sections"]["reads_report"]["seen"] == {"first": "passed", "hangs": "timeout",
                                                          "reads_report": "running", "crashes": "pending"}
    assert "exited with code 7 and wrote no result" in report["sections"]["crashes"]["error"]
    on_disk = json.loads((out / "gpu_report.json").read_text())
    assert on_disk["verdict"] == "FAILED" and on_disk["sections"]["hangs"]["status"] == "timeout"
    markdown = (out / "gpu_report.md").read_text()
    assert "## hangs: timeout" in markdown and "| crashes | failed |" in markdown
    assert (out / "logs" / "hangs.log").is_file()


def test_the_budget_cuts_the_running_section_and_starts_no_other(tmp_path):
    out = tmp_path / "report"
    snapshots = []
    sections = [selftest("first", "quick", 30), selftest("long", "hang", 60.0), selftest("never", "quick", 30)]
    report = run_sections(sections, out, budget_s=3.0, options={"out": str(out)}, min_start_s=1,
                          on_change=lambda r: snapshots.append({n: s["status"] for n, s in r["sections"].items()}))
    long, never = report["sections"]["long"], report["sections"]["never"]
    assert long["status"] == "timeout" and long["cut_by"] == "budget" and long["timeout_s"] < 3.0
    assert never["status"] == "skipped: budget" and never["budget_left_s"] < 1
    assert report["elapsed_s"] < 3.0 + GRACE_S + 5
    # written before the first section, at each start and at each end
    assert snapshots[0] == {"first": "pending", "long": "pending", "never": "pending"}
    assert {"first": "passed", "long": "running", "never": "pending"} in snapshots
    assert json.loads((out / "gpu_report.json").read_text())["sections"]["never"]["status"] == "skipped: budget"


def test_a_stopped_command_ends_the_running_section_and_says_so_in_the_report(tmp_path):
    out = tmp_path / "report"
    code = ("from gatepro_dist.experiments.bench.gpu_run import Section, exit_on_sigterm, run_sections\n"
            "exit_on_sigterm()\n"
            f"run_sections([Section('hangs', {SELFTEST + 'hang'!r}, 60, needs_cuda=False)], {str(out)!r}, 120, {{}}, "
            "min_start_s=1)\n")
    command = subprocess.Popen([sys.executable, "-c", code])
    log, deadline = out / "logs" / "hangs.log", time.monotonic() + 60
    while not (log.is_file() and "pid" in log.read_text()):  # the section's process is up and sleeping
        assert time.monotonic() < deadline and command.poll() is None
        time.sleep(0.1)
    pid = int(log.read_text().split("pid")[1].split()[0])
    command.terminate()  # as a job's time limit would
    assert command.wait(timeout=30) == 128 + 15
    hangs = json.loads((out / "gpu_report.json").read_text())["sections"]["hangs"]
    assert hangs["status"] == "interrupted" and "stopped" in hangs["error"]
    assert verdict({"sections": {"hangs": hangs}}) == "INCOMPLETE"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the section's process went with the command


def test_cuda_sections_on_a_cpu_say_needs_cuda_and_run_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # also on a GPU machine
    numerics = next(s for s in gpu.SECTIONS if s.name == "numerics")
    report = run_sections([numerics], tmp_path, budget_s=120, options={"out": str(tmp_path)}, min_start_s=1)
    body = report["sections"]["numerics"]
    assert body["status"] == "needs CUDA" and body["reason"].startswith("needs CUDA: torch ")
    assert "cases" not in body and "passed" not in body  # no result made up
    assert verdict(report) == "INCOMPLETE"


def test_every_section_names_a_function_that_exists_and_only_env_runs_without_cuda():
    assert gpu.NAMES == ("env", "collectives", "sync_debug", "numerics", "resume", "timing", "fsdp",
                         "megatron_check", "tests")
    for section in gpu.SECTIONS:
        module, function = section.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), section.target
        assert section.needs_cuda == (section.name != "env") and section.what
    assert sum(s.timeout_s for s in gpu.SECTIONS[:4]) < 540  # the short checks fit the default budget


def test_gpu_options_default_to_the_acceptance_run_and_refuse_what_cannot_run(capsys):
    args = gpu.parse_args([])
    assert args.budget_s == 540 and args.sections == gpu.NAMES and args.tokens == [4096, 16384, 32768]
    assert (args.resume_steps, args.resume_at, args.hidden, args.ffn, args.experts, args.top_k) == (15, 10, 1024, 2048, 16, 2)
    args = gpu.parse_args(["--skip", "tests,megatron_check", "--timeout", "timing=30", "--tokens", "128,256"])
    assert args.sections == gpu.NAMES[:-2] and args.timeout == {"timing": 30.0} and args.tokens == [128, 256]
    timing = next(s for s in gpu.chosen_sections(args) if s.name == "timing")
    assert timing.timeout_s == 30.0
    assert gpu.parse_args(["--sections", "numerics,env"]).sections == ("numerics", "env")
    for bad, message in ((["--skip", "lunch"], "--skip lunch: not a section"),
                         (["--timeout", "lunch=3"], "--timeout lunch: not a section"),
                         (["--ffn", "1004"], "--ffn 1004 is not a multiple of 8"),
                         (["--resume-at", "15"], "need 0 < --resume-at < --resume-steps")):
        with pytest.raises(SystemExit) as exit_:
            gpu.parse_args(bad, prog="gatepro-bench gpu")
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_verdict_passes_only_when_every_section_ran_and_passed():
    def report(*states):
        return {"sections": {f"s{i}": {"status": s} for i, s in enumerate(states)}}

    assert verdict(report("passed", "skipped: megatron-core is not importable")) == "PASSED"
    assert verdict(report("passed", "timeout")) == "FAILED"
    assert verdict(report("passed", "skipped: budget")) == "INCOMPLETE"
    assert verdict(report("passed", "needs CUDA")) == "INCOMPLETE"
    assert verdict(report("skipped: megatron-core is not importable")) == "INCOMPLETE"  # nothing ran


def test_expert_flops_and_the_dense_matmul_doing_the_same_work():
    flops = expert_gemm_flops(tokens=8192, top_k=2, hidden=512, ffn=1024)
    assert flops == 3 * 2 * (8192 * 2) * 512 * (3 * 1024)  # fwd + dgrad + wgrad; gate, up, down
    m, k, n = dense_shapes(8192, 2, 512, 1024)
    assert 3 * 2 * m * k * n == flops


def test_timing_rows_in_the_report_with_tflops_and_the_fraction_of_dense(tmp_path):
    row = timing_row("ours", {"median_ms": 4.0, "p10_ms": 3.0, "p90_ms": 5.0}, flops=2 * 10**12, dense_median_ms=3.0)
    assert row["tflops"] == pytest.approx(500.0) and row["fraction_of_dense"] == pytest.approx(0.75)
    assert "fraction_of_dense" not in timing_row("dense", {"median_ms": 1.0}, 10**12, None)
    rows = [{"tokens": 4096, **row, "step_peak_mib": 812.4},
            {"tokens": 4096, "name": "Megatron-core MoELayer (SequentialMLP)", "error": "RuntimeError: x"}]
    report = {"budget_s": 540, "elapsed_s": 12.0,
              "sections": {"timing": {"status": "failed", "what": "times", "rows": rows, "passed": False}}}
    _, md_path = write_report(report, tmp_path)
    md = md_path.read_text()
    assert "| 4096 | ours | 4.000 | 3.000-5.000 | 500.0 | 75% | 812 |" in md
    assert "| 4096 | Megatron-core MoELayer (SequentialMLP) | error: RuntimeError: x |" in md
    assert "**FAILED**: 12 s of a 540 s budget" in md


def test_device_timer_on_the_cpu_clock_times_every_round_after_warmup():
    calls = []
    steps = {"a": lambda: calls.append("a"), "nap": lambda: (calls.append("nap"), time.sleep(0.003))}
    times = time_steps_ms(steps, repeats=4, warmup=2, device=torch.device("cpu"))
    assert calls.count("a") == calls.count("nap") == 6
    assert calls[:4] == ["a", "nap", "nap", "a"]  # the order rotates each round
    assert [len(times["a"]), len(times["nap"])] == [4, 4]
    assert min(times["nap"]) >= 3.0  # milliseconds: a sleep lasts at least what it was asked
    assert summary([1.0, 2.0, 3.0])["median_ms"] == 2.0
    assert step_peak_memory(lambda: None, torch.device("cpu")) is None  # the CPU keeps no peak


def test_gatepro_bench_lists_the_gpu_subcommand():
    done = subprocess.run([sys.executable, "-m", "gatepro_dist.experiments.bench.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "gpu" in done.stdout and "GPU acceptance" in done.stdout


# The sections' checks take a device: on the CPU, at tiny sizes, they run end to end.

@pytest.fixture
def one_thread():
    """Tiny tensors on a 2-core machine shared with other test runs: one intra-op thread is several
    times faster than two threads that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_numerics_check_sees_empty_experts_odd_counts_and_bf16_errors_of_bf16_size(one_thread):
    result = compare_case(torch.device("cpu"), 161, skewed=True, capacity_factor=None, hidden=32, ffn=32)
    assert result["empty_experts"] == [12, 13, 14, 15] and result["counts_not_multiple_of_8"] > 0
    assert result["passed"] and result["autocast: same routing"] and result["bf16 params: empty experts' gradients exactly 0"]
    for mode in ("autocast", "bf16 params"):
        errors = result["relative_errors"][mode]
        assert 1e-4 < min(errors[k] for k in ("output", "input_grad", "gate_up_grad")) < 2e-2  # bf16, not fp32
        assert errors["aux_loss"] < 1e-6 and errors["z_loss"] < 1e-6  # fp32 logits in every run
    capacity = compare_case(torch.device("cpu"), 161, skewed=True, capacity_factor=1.0, hidden=32, ffn=32)
    assert capacity["dropped"] > 0 and capacity["passed"]
    md = markdown({"sections": {"numerics": {"status": "passed", "cases": {"skewed": result, "capacity": capacity}}}})
    assert "| skewed | autocast | " in md and "| capacity | bf16 params | " in md


def test_collectives_check_on_the_gloo_group_of_one():
    result = check_collectives(torch.device("cpu"))
    assert "gloo" in result["backend"] and result["host_messages_on"] == "cpu"
    assert result["checks"]["all_to_all_single, zero rows (an idle rank)"] == "pass"
    assert result["passed"], result["checks"]


def test_timing_rows_on_the_cpu_time_every_variant(one_thread):
    rows = time_rows(torch.device("cpu"), 64, hidden=32, ffn=32, experts=4, top_k=2, repeats=2, warmup=1)
    assert [r["name"] for r in rows] == ["dense bf16 matmul, same FLOPs", "grouped GEMMs alone (bf16)",
                                         "ours, fp32 params + bf16 autocast", "ours, bf16 expert params"]
    assert all(r["tokens"] == 64 and r["tflops"] > 0 and "step_peak_mib" not in r for r in rows)


TINY = ("model: {d_model: 32, n_layers: 2, n_heads: 2, n_kv_heads: 1, max_seq_len: 64}\n"
        "moe: {num_experts: 8, expert_ffn_dim: 32}\ndata: {seq_len: 32, max_bytes: 300000}\n"
        "train: {global_batch_size: 8, lr: 3.0e-3, warmup_steps: 2}\n")
TINY_BASE = ("parallel.ep=1", "train.dtype=bf16", "train.progress=false")


def test_resume_check_stops_like_a_preemption_and_resumes_to_the_same_losses(tmp_path, one_thread):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    result = resume_check(lambda name, kwargs: train_phase(**kwargs), str(config), tmp_path / "runs", "cpu",
                          steps=4, at=2, base=TINY_BASE)
    assert result["passed"] and result["interrupted_stopped_after"] == 2, result
    assert result["resume_message"].startswith("resumed from ") and " at step 2" in result["resume_message"]
    assert result["max_abs_diff_after_resume"] == 0.0 and len(result["losses_resumed"]) == 2
    # a resume that lost something fails
    full = {"losses": {str(s): 5.0 - 0.1 * s for s in range(1, 6)}, "messages": []}
    resumed = {"losses": {**full["losses"], "5": 4.6}, "messages": ["resumed from x at step 3"]}
    bad = compare_resume(full, full, {**full, "stopped_after": 3}, resumed, 5, 3)
    assert not bad["passed"] and bad["max_abs_diff_after_resume"] == pytest.approx(0.1)

"""The GPU acceptance run's arithmetic and report: FLOPs, TFLOP/s rows, the verdict, and the JSON +
Markdown files (rewritten after every section by ``gpu_run``).

Pure functions of a report dict, so they are tested on the CPU (tests/test_gpu_bench.py). The report:
``{"command", "budget_s", "elapsed_s", "sections": {name: {"status", "what", "timeout_s", ...}}}``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

RAN = ("passed", "failed", "timeout")  # states of a section that ran (needs CUDA / skipped did not)


def expert_gemm_flops(tokens: int, top_k: int, hidden: int, ffn: int) -> int:
    """The useful work of one MoE layer fwd+bwd: its routed SwiGLU experts' GEMMs (as ``layer.py``'s floor)."""
    from .rounds import BenchConfig  # here, not at the top: the report (and the orchestrator) need no torch

    return BenchConfig(tokens=tokens, hidden=hidden, ffn=ffn, top_k=top_k).gemm_flops()


def dense_shapes(tokens: int, top_k: int, hidden: int, ffn: int) -> tuple[int, int, int]:
    """(M, K, N) of one dense matmul whose fwd + two bwd GEMMs do exactly ``expert_gemm_flops``:
    all routed rows through one [hidden, 3*ffn] weight (gate, up and down of one expert side by side)."""
    return tokens * top_k, hidden, 3 * ffn


def timing_row(name: str, times: dict[str, float], flops: int, dense_median_ms: float | None) -> dict:
    """One timed variant: its times, TFLOP/s of ``flops`` at the median, and its speed relative to dense."""
    row = {"name": name, **times, "tflops": flops / (times["median_ms"] * 1e-3) / 1e12}
    if dense_median_ms is not None:
        row["fraction_of_dense"] = dense_median_ms / times["median_ms"]
    return row


def verdict(report: dict) -> str:
    """PASSED: every section ran and passed (a ``skipped: <why>`` section, e.g. Megatron not installed,
    does not count against it); FAILED: a section failed or timed out; INCOMPLETE: none failed, but
    some did not run (budget, no CUDA, still pending) or nothing ran at all."""
    states = [s["status"] for s in report.get("sections", {}).values()]
    if any(state in ("failed", "timeout") for state in states):
        return "FAILED"
    ran = [state for state in states if state in RAN]
    not_run = [s for s in states if s not in RAN and not (s.startswith("skipped") and s != "skipped: budget")]
    return "PASSED" if ran and not not_run else "INCOMPLETE"


def _env_line(report: dict) -> str:
    env = report.get("sections", {}).get("env", {})
    if env.get("status") != "passed":
        return "environment: not recorded (see the env section)"
    cublas = env.get("cublas") or {}
    parts = [env.get("device_name") or "no CUDA device", f"driver {env.get('driver') or '?'}",
             f"torch {env.get('torch')}", f"CUDA {env.get('cuda') or '-'}", f"NCCL {env.get('nccl') or '-'}",
             f"cuBLAS {cublas.get('version') or '-'}", f"cuDNN {env.get('cudnn') or '-'}",
             f"megatron-core {env.get('megatron_core') or 'not installed'}"]
    return ", ".join(parts)


def _rows_table(rows: list[dict]) -> list[str]:
    lines = ["| tokens | variant | median ms | p10-p90 ms | TFLOP/s | vs dense | step peak MiB |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row.get('tokens', '')} | {row['name']} | error: {row['error']} | | | | |")
            continue
        vs = f"{100 * row['fraction_of_dense']:.0f}%" if "fraction_of_dense" in row else "-"
        peak = "-" if row.get("step_peak_mib") is None else f"{row['step_peak_mib']:.0f}"
        lines.append(f"| {row.get('tokens', '')} | {row['name']} | {row['median_ms']:.3f} | "
                     f"{row['p10_ms']:.3f}-{row['p90_ms']:.3f} | {row['tflops']:.1f} | {vs} | {peak} |")
    return lines + [""]


_ERROR_KEYS = ("output", "input_grad", "router_grad", "gate_up_grad", "down_grad", "aux_loss", "z_loss")


def _errors_table(cases: dict) -> list[str]:
    """The numerics section's relative errors: one row per case and bf16 mode."""
    lines = ["| case | bf16 mode | " + " | ".join(_ERROR_KEYS) + " |", "| --- | --- |" + " ---: |" * len(_ERROR_KEYS)]
    for case, body in cases.items():
        for mode, errors in body.get("relative_errors", {}).items():
            lines.append(f"| {case} | {mode} | " + " | ".join(f"{errors.get(k, float('nan')):.2e}" for k in _ERROR_KEYS) + " |")
    return lines + [""]


_SHOWN_APART = ("status", "what", "passed", "error", "rows", "log_tail", "traceback_tail", "output_tail")


def markdown(report: dict) -> str:
    sections = report.get("sections", {})
    lines = ["# GPU acceptance run", "", _env_line(report), "",
             f"**{verdict(report)}**: {report.get('elapsed_s', 0):.0f} s of a {report.get('budget_s', 0):.0f} s "
             "budget. This file is rewritten after every section: a section cut at its timeout says `timeout`, "
             "one not started for lack of time `skipped: budget`.", ""]
    if report.get("command"):
        lines += [f"`{report['command']}`", ""]
    lines += ["| section | status | seconds | what it checks |", "| --- | --- | ---: | --- |"]
    for name, body in sections.items():
        seconds = body.get("elapsed_s")
        lines.append(f"| {name} | {body['status']} | {'' if seconds is None else f'{seconds:.1f}'} | "
                     f"{body.get('what', '')} |")
    lines.append("")
    for name, body in sections.items():
        if body["status"] == "pending":
            continue
        lines += [f"## {name}: {body['status']}", ""]
        if body.get("error"):
            lines += ["```", str(body["error"]), "```", ""]
        if body.get("rows"):
            lines += _rows_table(body["rows"])
        cases = body.get("cases")
        if isinstance(cases, dict) and any("relative_errors" in c for c in cases.values() if isinstance(c, dict)):
            lines += _errors_table(cases)
        for key, value in body.items():
            if key not in _SHOWN_APART:
                lines.append(f"- {key}: {json.dumps(value, default=str)}")
        for key in ("traceback_tail", "output_tail", "log_tail"):
            if body.get(key):
                lines += ["", f"{key}:", "```", str(body[key]).rstrip()[-3000:], "```"]
        lines.append("")
    return "\n".join(lines)


def _replace(path: Path, text: str) -> None:
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(text)
    os.replace(scratch, path)  # a reader (or a cut) never meets half a report


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``gpu_report.json`` (the report, with its verdict) and ``gpu_report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "verdict": verdict(report)}
    json_path, md_path = out / "gpu_report.json", out / "gpu_report.md"
    _replace(json_path, json.dumps(report, indent=1, default=str) + "\n")
    _replace(md_path, markdown(report))
    return json_path, md_path

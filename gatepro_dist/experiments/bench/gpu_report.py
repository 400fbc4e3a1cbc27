"""The GPU acceptance run's arithmetic and report: FLOPs, TFLOP/s rows, and the JSON + Markdown files.

Pure functions of a results dict, so they are tested on the CPU (tests/test_gpu_bench.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from .rounds import BenchConfig

SECTIONS = ("tests", "layer_check", "train", "layer", "megatron_check")


def expert_gemm_flops(tokens: int, top_k: int, hidden: int, ffn: int) -> int:
    """The useful work of one MoE layer fwd+bwd: its routed SwiGLU experts' GEMMs (as ``layer.py``'s floor)."""
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


def passed(results: dict) -> bool:
    """Every section that ran passed; a section that could not run (e.g. Megatron not installed) does not count."""
    ran = [results[s] for s in SECTIONS if s in results and not results[s].get("skipped")]
    return bool(ran) and all(section.get("passed", False) for section in ran)


def markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = ["# GPU acceptance run", "",
             f"{env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
             f"megatron-core {env.get('megatron_core') or 'not installed'}, "
             f"Transformer Engine {env.get('transformer_engine') or 'not installed'}", "",
             f"**{'PASSED' if passed(results) else 'FAILED'}**", ""]
    for section in SECTIONS:
        if section not in results:
            continue
        body = results[section]
        state = "skipped" if body.get("skipped") else ("passed" if body.get("passed") else "FAILED")
        lines += [f"## {section}: {state}", ""]
        if body.get("skipped"):
            lines += [str(body["skipped"]), ""]
        if body.get("error"):
            lines += ["```", str(body["error"]), "```", ""]
        if section == "layer" and body.get("rows"):
            cfg = body["config"]
            lines += [f"tokens={cfg['tokens']} d={cfg['hidden']} ffn={cfg['ffn']} experts={cfg['experts']} "
                      f"top-{cfg['top_k']} bf16; expert GEMM work {body['gflop']:.1f} GFLOP per fwd+bwd; "
                      f"CUDA-event times over {cfg['repeats']} interleaved rounds", "",
                      "| variant | median ms | p10-p90 ms | TFLOP/s | vs dense |", "| --- | ---: | ---: | ---: | ---: |"]
            for row in body["rows"]:
                vs = f"{100 * row['fraction_of_dense']:.0f}%" if "fraction_of_dense" in row else "-"
                lines.append(f"| {row['name']} | {row['median_ms']:.3f} | {row['p10_ms']:.3f}-{row['p90_ms']:.3f} "
                             f"| {row['tflops']:.1f} | {vs} |")
            lines.append("")
        for key, value in body.items():
            if key not in ("passed", "skipped", "error", "rows", "config", "output_tail"):
                lines.append(f"- {key}: {json.dumps(value)}")
        if body.get("output_tail"):
            lines += ["", "```", body["output_tail"].rstrip(), "```"]
        lines.append("")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """``gpu_report.json`` (the results, with the verdict) and ``gpu_report.md`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "passed": passed(results)}
    json_path, md_path = out / "gpu_report.json", out / "gpu_report.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path

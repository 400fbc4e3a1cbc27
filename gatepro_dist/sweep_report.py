"""Aggregate a sweep: one CSV row per run, plus comparison plots.

CSV columns (``summary.csv`` in the sweep's out_dir):
  run, world, <one column per axis key>, steps, final_loss, final_val_loss, best_val_loss,
  mean_tokens_per_s, final_zero_token_experts (summed over MoE layers),
  mean_zero_token_experts_last10pct (per layer, averaged), first_step_all_experts_used (first
  step at which no layer had a zero-token expert, empty if never), final_mean_cos (router
  similarity averaged over layers), gatepro_on_steps.

Plots: ``zero_token_experts.png`` (per layer, one line per run), ``val_loss.png``,
``throughput.png`` (tokens/s against world size: scaling), ``penalty.png`` (final validation
loss against router.gatepro.penalty, when that is an axis).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from .metrics import read_metrics
from .sweep import Sweep

BASE_COLUMNS = ["run", "world"]
RESULT_COLUMNS = ["steps", "final_loss", "final_val_loss", "best_val_loss", "mean_tokens_per_s",
                  "final_zero_token_experts", "mean_zero_token_experts_last10pct",
                  "first_step_all_experts_used", "final_mean_cos", "gatepro_on_steps"]


def summarize_run(records: list[dict]) -> dict:
    last = records[-1]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    tail = records[-max(1, math.ceil(len(records) / 10)):]
    zero_tail = [sum(l["zero_token_experts"] for l in r["moe"]) / max(1, len(r["moe"])) for r in tail if r.get("moe")]
    first_all_used = next((r["step"] for r in records if r.get("moe") and all(l["zero_token_experts"] == 0 for l in r["moe"])), "")
    sims = [l["similarity"]["mean_cos"] for l in last.get("moe", []) if "similarity" in l]
    rates = [r["tokens_per_s"] for r in records[1:] or records if "tokens_per_s" in r]
    return {
        "steps": last["step"],
        "final_loss": last.get("loss"),
        "final_val_loss": vals[-1] if vals else "",
        "best_val_loss": min(vals) if vals else "",
        "mean_tokens_per_s": sum(rates) / len(rates) if rates else "",
        "final_zero_token_experts": sum(l["zero_token_experts"] for l in last.get("moe", [])),
        "mean_zero_token_experts_last10pct": sum(zero_tail) / len(zero_tail) if zero_tail else "",
        "first_step_all_experts_used": first_all_used,
        "final_mean_cos": sum(sims) / len(sims) if sims else "",
        "gatepro_on_steps": sum(1 for r in records if r.get("gatepro")),
    }


def aggregate(sweep: Sweep) -> Path:
    """Write summary.csv (one row per finished run) and the plots; return the CSV path."""
    axis_keys = []
    for run in sweep.runs:
        for key in run.axes:
            if key != "world" and key not in axis_keys:
                axis_keys.append(key)
    rows, curves = [], {}
    for run in sweep.runs:
        metrics = run.run_dir(sweep.out_dir) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        records = read_metrics(metrics)
        curves[run.name] = records
        row = {"run": run.name, "world": run.world, **{k: run.axes.get(k, "") for k in axis_keys}}
        rows.append({**row, **summarize_run(records)})
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.out_dir / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BASE_COLUMNS + axis_keys + RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        _plots(sweep, rows, curves, axis_keys)
    return path


def _plots(sweep: Sweep, rows: list[dict], curves: dict[str, list[dict]], axis_keys: list[str]) -> None:
    from matplotlib.figure import Figure

    layers = max((len(r[0].get("moe", [])) for r in curves.values()), default=0)
    if layers:
        fig = Figure(figsize=(4 * min(layers, 4), 3.2 * math.ceil(layers / 4)), layout="constrained")
        axes = fig.subplots(math.ceil(layers / 4), min(layers, 4), squeeze=False).ravel()
        for layer, ax in enumerate(axes[:layers]):
            for name, records in curves.items():
                pts = [(r["step"], r["moe"][layer]["zero_token_experts"]) for r in records if len(r.get("moe", [])) > layer]
                ax.plot(*zip(*pts), label=name, linewidth=1)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel("zero-token experts")
        axes[0].legend(fontsize=6)
        fig.savefig(sweep.out_dir / "zero_token_experts.png", dpi=110)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, records in curves.items():
        pts = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=name)
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss")
    ax.legend(fontsize=6)
    fig.savefig(sweep.out_dir / "val_loss.png", dpi=110)

    worlds = sorted({r["world"] for r in rows})
    if len(worlds) > 1:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        series: dict[str, list] = {}
        for r in rows:
            label = ", ".join(f"{k.split('.')[-1]}={r[k]}" for k in axis_keys if k not in ("world", "train.global_batch_size")) or "runs"
            series.setdefault(label, []).append((r["world"], r["mean_tokens_per_s"]))
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.set(xlabel="processes", ylabel="tokens/s", title="Throughput against world size")
        ax.legend(fontsize=6)
        fig.savefig(sweep.out_dir / "throughput.png", dpi=110)

    if "router.gatepro.penalty" in axis_keys:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        pts = sorted((float(r["router.gatepro.penalty"]), r["final_val_loss"]) for r in rows if r["final_val_loss"] != "")
        if pts:
            ax.plot(*zip(*pts), marker="o")
            ax.set_xscale("symlog", linthresh=1e-6)
        ax.set(xlabel="GatePro penalty λ", ylabel="final validation loss", title="λ sensitivity")
        fig.savefig(sweep.out_dir / "penalty.png", dpi=110)

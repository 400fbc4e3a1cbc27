"""Aggregate a sweep: one CSV row per run, a mean ± std table over seeds, comparison plots.

CSV columns (``summary.csv`` in the sweep's out_dir, one row per finished run):
  run, world, <one column per axis key>, steps, final_loss, final_val_loss, best_val_loss,
  mean_tokens_per_s, final_zero_token_experts (summed over MoE layers),
  mean_zero_token_experts_last10pct (per layer, averaged), first_step_all_experts_used (first
  step at which no layer had a zero-token expert, empty if never), final_mean_cos (router
  similarity averaged over layers), gatepro_on_steps, final_mean_angle_deg and
  final_spectral_entropy (the other two similarity statistics of the last record, averaged over
  layers), gatepro_penalised ((token, expert) entries that received GatePro's penalty, summed over
  steps and layers), gatepro_topk_changed (tokens whose selected set the penalty changed, summed
  over steps and layers), all_experts_used_from_step (first step from which every logged step
  had no zero-token expert in any layer, i.e. the step at which the run's expert usage became
  complete for good; empty if the last step still had one), mean_zero_token_experts (per layer,
  averaged over every logged step: the area under the zero-token curve, so lower means experts
  came into use sooner), mean_loss_last10pct (training loss averaged over the last 10% of logged
  steps: many more tokens than one evaluation, so less noisy than final_loss),
  first_below_penalty and final_below_penalty (share of tokens whose k-th and (k+1)-th selection
  scores are closer than GatePro's penalty, i.e. the decisions it could change, at the first and
  last logged step, averaged over layers), gatepro_changed_fraction (gatepro_topk_changed over
  the tokens routed, all steps and layers), final_dead_experts (experts with less than 0.1/N of
  the assignments over the last 10 steps, at the last step, averaged over layers: unlike the
  zero-token count it does not depend on the batch size), mean_partner_co_selection (share of
  tokens whose top-k holds an expert and its most similar partner, averaged over steps and
  layers), final_mean_abs_cos (the mean absolute cosine of the router rows, the paper's "average
  cosine similarity", last record, averaged over layers). Columns a run does not log are empty.

When ``train.seed`` is an axis, runs that differ only in their seed form a group, and
``summary_over_seeds.csv`` holds one row per group: group, <the other axis keys>, seeds (runs in
the group), then ``<stat>_mean`` and ``<stat>_std`` (sample standard deviation, n − 1) for each
stat in SEED_STATS. A stat is left empty for a group when any of its runs lacks it (e.g.
final_val_loss of a run that never evaluated). ``summary_over_seeds.md`` is
the same table as "mean ± std" in Markdown.

Plots: ``zero_token_experts.png`` (per layer), ``val_loss.png``, ``similarity.png`` (mean cosine
and spectral entropy of the router rows' similarity matrix S, averaged over layers, against step)
draw one line per group: the mean over its seeds with a band from the lowest to the highest seed
(a group without seeds is one run). ``throughput.png`` (tokens/s against world size: scaling) and ``penalty.png`` (final
validation loss against router.gatepro.penalty, mean ± std over seeds) appear when those are axes.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from ..train.report import gatepro_changed_fraction, mean_below_penalty
from .sweep import Sweep, run_records

SEED_AXIS = "train.seed"
BASE_COLUMNS = ["run", "world"]
RESULT_COLUMNS = ["steps", "final_loss", "final_val_loss", "best_val_loss", "mean_tokens_per_s",
                  "final_zero_token_experts", "mean_zero_token_experts_last10pct",
                  "first_step_all_experts_used", "final_mean_cos", "gatepro_on_steps",
                  "final_mean_angle_deg", "final_spectral_entropy", "gatepro_penalised",
                  "gatepro_topk_changed", "all_experts_used_from_step", "mean_zero_token_experts", "mean_loss_last10pct",
                  "first_below_penalty", "final_below_penalty", "gatepro_changed_fraction",
                  "final_dead_experts", "mean_partner_co_selection", "final_mean_abs_cos"]
SEED_STATS = ["final_val_loss", "mean_loss_last10pct", "final_zero_token_experts",
              "mean_zero_token_experts", "mean_zero_token_experts_last10pct", "final_mean_cos",
              "final_spectral_entropy", "gatepro_topk_changed", "final_below_penalty",
              "final_dead_experts", "mean_partner_co_selection", "final_mean_abs_cos"]
SIMILARITY_STATS = {"mean_cos": "mean cosine similarity", "spectral_entropy": "spectral entropy of S"}


def _layer_mean_similarity(record: dict, stat: str) -> float | None:
    """``stat`` of the router similarity averaged over layers; None when the record has none."""
    values = [l["similarity"][stat] for l in record.get("moe", []) if stat in l.get("similarity", {})]
    return sum(values) / len(values) if values else None


def summarize_run(records: list[dict]) -> dict:
    last = records[-1]
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    tail = records[-max(1, math.ceil(len(records) / 10)):]
    zero_per_layer = {r["step"]: sum(l["zero_token_experts"] for l in r["moe"]) / len(r["moe"]) for r in records if r.get("moe")}
    zero_tail = [zero_per_layer[r["step"]] for r in tail if r["step"] in zero_per_layer]
    first_all_used = next((r["step"] for r in records if r.get("moe") and all(l["zero_token_experts"] == 0 for l in r["moe"])), "")
    rates = [r["tokens_per_s"] for r in records[1:] or records if "tokens_per_s" in r]
    used_from = ""
    for r in reversed(records):
        if not r.get("moe"):
            continue
        if any(l["zero_token_experts"] for l in r["moe"]):
            break
        used_from = r["step"]

    def similarity(stat: str):
        value = _layer_mean_similarity(last, stat)
        return "" if value is None else value

    def summed(name: str) -> int:
        return sum(l.get(name, 0) for r in records for l in r.get("moe", []))

    with_margin = [r for r in records if mean_below_penalty(r) is not None]
    changed_fraction = gatepro_changed_fraction(records)

    return {
        "steps": last["step"],
        "final_loss": last.get("loss"),
        "final_val_loss": vals[-1] if vals else "",
        "best_val_loss": min(vals) if vals else "",
        "mean_tokens_per_s": sum(rates) / len(rates) if rates else "",
        "final_zero_token_experts": sum(l["zero_token_experts"] for l in last.get("moe", [])),
        "mean_zero_token_experts_last10pct": sum(zero_tail) / len(zero_tail) if zero_tail else "",
        "first_step_all_experts_used": first_all_used,
        "final_mean_cos": similarity("mean_cos"),
        "gatepro_on_steps": sum(1 for r in records if r.get("gatepro")),
        "final_mean_angle_deg": similarity("mean_angle_deg"),
        "final_spectral_entropy": similarity("spectral_entropy"),
        "gatepro_penalised": summed("gatepro_penalised"),
        "gatepro_topk_changed": summed("gatepro_topk_changed"),
        "all_experts_used_from_step": used_from,
        "mean_zero_token_experts": sum(zero_per_layer.values()) / len(zero_per_layer) if zero_per_layer else "",
        "mean_loss_last10pct": statistics.fmean(r["loss"] for r in tail) if all("loss" in r for r in tail) else "",
        "first_below_penalty": mean_below_penalty(with_margin[0]) if with_margin else "",
        "final_below_penalty": mean_below_penalty(with_margin[-1]) if with_margin else "",
        "gatepro_changed_fraction": "" if changed_fraction is None else changed_fraction,
        "final_dead_experts": (sum(l["dead_experts"] for l in last["moe"]) / len(last["moe"])
                               if last.get("moe") and all("dead_experts" in l for l in last["moe"]) else ""),
        "mean_partner_co_selection": _mean_or_blank([l["partner_co_selection"] for r in records
                                                     for l in r.get("moe", []) if "partner_co_selection" in l]),
        "final_mean_abs_cos": similarity("mean_abs_cos"),
    }


def _mean_or_blank(values: list[float]):
    return statistics.fmean(values) if values else ""


def _group_key(row: dict, axis_keys: list[str]) -> tuple:
    # A list-valued axis (e.g. router.gatepro.schedule) is keyed by its JSON text.
    return tuple((k, json.dumps(row[k]) if isinstance(row[k], (list, dict)) else row[k])
                 for k in axis_keys if k != SEED_AXIS)


def _group_label(key: tuple) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in key) or "all runs"


def group_over_seeds(rows: list[dict], axis_keys: list[str]) -> dict[tuple, list[dict]]:
    """Rows that differ only in ``train.seed``, in first-seen order (each row alone without that axis)."""
    if SEED_AXIS not in axis_keys:
        return {(("run", row["run"]),): [row] for row in rows}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_key(row, axis_keys), []).append(row)
    return groups


def _mean_std(values: list) -> tuple:
    if not values or any(v == "" or v is None for v in values):
        return "", ""
    floats = [float(v) for v in values]
    return statistics.fmean(floats), statistics.stdev(floats) if len(floats) > 1 else 0.0


def summarize_over_seeds(rows: list[dict], axis_keys: list[str]) -> list[dict]:
    out = []
    for key, members in group_over_seeds(rows, axis_keys).items():
        row = {"group": _group_label(key), **dict(key), "seeds": len(members)}
        for stat in SEED_STATS:
            row[f"{stat}_mean"], row[f"{stat}_std"] = _mean_std([m[stat] for m in members])
        out.append(row)
    return out


def _markdown_over_seeds(seed_rows: list[dict]) -> str:
    def cell(row, stat):
        mean, std = row[f"{stat}_mean"], row[f"{stat}_std"]
        if mean == "":
            return "—"
        digits = 3 if abs(mean) < 100 else 0
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    lines = ["| group | seeds | " + " | ".join(SEED_STATS) + " |", "|---|---|" + "---|" * len(SEED_STATS)]
    lines += [f"| {r['group']} | {r['seeds']} | " + " | ".join(cell(r, s) for s in SEED_STATS) + " |" for r in seed_rows]
    return "\n".join(lines) + "\n"


def aggregate(sweep: Sweep) -> Path:
    """Write summary.csv (one row per finished run), the over-seeds table and the plots; return the CSV path."""
    axis_keys = []
    for run in sweep.runs:
        for key in run.axes:
            if key != "world" and key not in axis_keys:
                axis_keys.append(key)
    rows, curves = [], {}
    for run in sweep.runs:
        records = run_records(sweep, run)  # the run directory, or the sweep's archive
        if not records:
            continue
        curves[run.name] = records
        row = {"run": run.name, "world": run.world, **{k: run.axes.get(k, "") for k in axis_keys}}
        rows.append({**row, **summarize_run(records)})
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    path = sweep.out_dir / "summary.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=BASE_COLUMNS + axis_keys + RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if rows and SEED_AXIS in axis_keys:
        seed_rows = summarize_over_seeds(rows, axis_keys)
        other_axes = [k for k in axis_keys if k != SEED_AXIS]
        stat_columns = [f"{s}_{m}" for s in SEED_STATS for m in ("mean", "std")]
        with open(sweep.out_dir / "summary_over_seeds.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["group", *other_axes, "seeds", *stat_columns])
            writer.writeheader()
            writer.writerows(seed_rows)
        (sweep.out_dir / "summary_over_seeds.md").write_text(_markdown_over_seeds(seed_rows))
    if rows:
        _plots(sweep, rows, curves, axis_keys)
    return path


# ------------------------------------------------------------------------------------------ plots


def plot_band(ax, members: list[list[dict]], value, label: str, color, style: str = "-") -> None:
    """Mean over ``members`` (one record list per seed) of ``value(record)`` per step; band: min to max."""
    by_step: dict[int, list[float]] = {}
    for records in members:
        for r in records:
            v = value(r)
            if v is not None:
                by_step.setdefault(r["step"], []).append(float(v))
    if not by_step:
        return
    steps = sorted(by_step)
    means = [statistics.fmean(by_step[s]) for s in steps]
    ax.plot(steps, means, style, label=label, color=color, linewidth=1)
    if len(members) > 1:
        ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                        color=color, alpha=0.2, linewidth=0)


def _plot_groups(ax, groups: list[tuple[str, list[list[dict]]]], value) -> None:
    for i, (label, members) in enumerate(groups):
        plot_band(ax, members, value, label, f"C{i % 10}")


def _plots(sweep: Sweep, rows: list[dict], curves: dict[str, list[dict]], axis_keys: list[str]) -> None:
    from matplotlib.figure import Figure

    seeded = SEED_AXIS in axis_keys
    groups = []
    for key, members in group_over_seeds(rows, axis_keys).items():
        label = f"{_group_label(key)} ({len(members)} seeds)" if seeded else members[0]["run"]
        groups.append((label, [curves[m["run"]] for m in members]))
    band_note = " (mean over seeds; band: min to max)" if seeded else ""

    layers = max((len(r[0].get("moe", [])) for r in curves.values()), default=0)
    if layers:
        fig = Figure(figsize=(4 * min(layers, 4), 3.2 * math.ceil(layers / 4)), layout="constrained")
        axes = fig.subplots(math.ceil(layers / 4), min(layers, 4), squeeze=False).ravel()
        for layer, ax in enumerate(axes[:layers]):
            _plot_groups(ax, groups, lambda r, i=layer: r["moe"][i]["zero_token_experts"] if len(r.get("moe", [])) > i else None)
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("step")
            ax.set_ylabel("zero-token experts")
        axes[0].legend(fontsize=6)
        if seeded:
            fig.suptitle("Zero-token experts" + band_note)
        fig.savefig(sweep.out_dir / "zero_token_experts.png", dpi=110)

    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    _plot_groups(ax, groups, lambda r: r.get("val_loss"))
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss" + band_note)
    ax.legend(fontsize=6)
    fig.savefig(sweep.out_dir / "val_loss.png", dpi=110)

    if any(_layer_mean_similarity(r, "mean_cos") is not None for records in curves.values() for r in records):
        fig = Figure(figsize=(5 * len(SIMILARITY_STATS), 4), layout="constrained")
        for ax, (stat, name) in zip(fig.subplots(1, len(SIMILARITY_STATS)), SIMILARITY_STATS.items()):
            _plot_groups(ax, groups, lambda r, s=stat: _layer_mean_similarity(r, s))
            ax.set(xlabel="step", ylabel=f"{name} (mean over layers)", title=f"Router rows: {name}")
            ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        fig.suptitle("Similarity of the router rows W_g" + band_note)
        fig.savefig(sweep.out_dir / "similarity.png", dpi=110)

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
        by_penalty: dict[float, list[float]] = {}
        for r in rows:
            if r["final_val_loss"] != "":
                by_penalty.setdefault(float(r["router.gatepro.penalty"]), []).append(float(r["final_val_loss"]))
        if by_penalty:
            penalties = sorted(by_penalty)
            stats = [_mean_std(by_penalty[p]) for p in penalties]
            ax.errorbar(penalties, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3)
            ax.set_xscale("symlog", linthresh=1e-6)
        ax.set(xlabel="GatePro penalty λ", ylabel="final validation loss", title="λ sensitivity" + band_note)
        fig.savefig(sweep.out_dir / "penalty.png", dpi=110)

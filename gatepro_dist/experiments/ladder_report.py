"""The ladder experiments: every table and plot, paired by seed with 95% intervals.

    python -m gatepro_dist.experiments.ladder_report [--out docs/results/ladder]

Reads every finished run of ``configs/sweeps/ladder_*.yaml`` (SWEEPS; from run directories or the
archive; runs are named ``<arm>_seed=<s>``) and writes under ``--out``: ``runs.csv`` (per run and
MoE layer, the numbers of METRICS), ``paired.csv`` (per comparison of COMPARISONS, metric and
layer: n seed pairs, mean difference, SD, 95% t-interval, whether it excludes 0 and what effect it
excludes), ``summary.md`` (the same in Markdown, a section per comparison) and ``zero_token.png``,
``dead_experts.png``, ``partner_co_selection.png`` (a row per sweep, a column per layer) and
``val_loss.png``: one line per arm, the mean over its seeds with a min-to-max band.

Sign convention: for the idle and step metrics and partner co-selection the difference is
control − arm (positive = the arm spreads experts faster / has fewer idle / co-selects partners
less); for validation loss and the changed share it is arm − control (a negative loss difference =
the arm is better). A layer that never got below the threshold counts as its run's last step + 1.
Missing runs are left out, and so are fields older runs lack (``dead_experts``,
``partner_co_selection``); below 2 pairs a row shows the values and "pending".
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..train.report import gatepro_changed_fraction
from .paired_stats import curve_area, excluded_effects, paired_interval
from .sweep import is_complete, load_sweep, run_config, run_records
from .sweep_report import plot_band
from .when_report import THRESHOLD, fmt, write_csv, final_val_loss, steps_to_threshold

SWEEPS = ("ladder_init0", "ladder_default_init", "ladder_precision", "ladder_slow", "ladder_late")
TAIL_STEPS = 100  # "the last 100 steps" of a run
ALL_LAYERS = "all"  # the layer column of a run-level metric


@dataclass(frozen=True)
class Comparison:
    """``arm`` of ``sweep`` against ``control`` of ``control_sweep`` (default: the same sweep)."""
    sweep: str
    arm: str
    control: str
    control_sweep: str | None = None

    @property
    def control_of(self) -> str:
        return self.control_sweep or self.sweep

    @property
    def label(self) -> str:
        where = "" if self.control_sweep is None else f"{self.control_sweep} "
        return f"{self.sweep}: {self.arm} vs {where}{self.control}"


# Adding an arm to a sweep is one line here.
COMPARISONS = (
    Comparison("ladder_init0", "penalty_1e-4", "baseline"),
    Comparison("ladder_init0", "penalty_1e-2", "baseline"),
    Comparison("ladder_init0", "mask", "baseline"),
    Comparison("ladder_init0", "random_mask", "baseline"),
    Comparison("ladder_init0", "probs_1e-4", "baseline"),
    Comparison("ladder_init0", "mask", "random_mask"),  # does the similar partner matter?
    Comparison("ladder_default_init", "mask", "baseline"),
    Comparison("ladder_default_init", "random_mask", "baseline"),
    Comparison("ladder_default_init", "mask", "random_mask"),
    Comparison("ladder_precision", "penalty_bf16_fp32_penalty", "baseline_bf16"),
    Comparison("ladder_precision", "penalty_bf16", "baseline_bf16"),
    Comparison("ladder_slow", "penalty_1e-4", "baseline"),
    Comparison("ladder_late", "late_penalty", "baseline", "ladder_init0"),
    Comparison("ladder_late", "late_mask", "baseline", "ladder_init0"),
)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    control_minus_arm: bool  # the sign of the difference: control − arm, or arm − control
    positive: str  # what a positive difference means for the arm
    negative: str
    unit: str = ""
    per_layer: bool = True


METRICS = (
    Metric("zero_token_area", "zero-token experts, mean level", True, "advantage", "disadvantage", "experts"),
    Metric("dead_last100", f"dead experts, mean over the last {TAIL_STEPS} steps", True, "advantage", "disadvantage", "experts"),
    Metric("dead_last", "dead experts at the last step", True, "advantage", "disadvantage", "experts"),
    Metric("steps_to_threshold", f"step from which < {THRESHOLD:.0%} of experts idle for good", True,
           "advantage", "disadvantage", "steps"),
    Metric("partner_mean", "partner co-selection, mean", True, "reduction", "increase"),
    Metric("partner_last100", f"partner co-selection, last {TAIL_STEPS} steps", True, "reduction", "increase"),
    Metric("changed_share", "share of top-k sets changed", False, "increase", "reduction"),
    Metric("final_val_loss", "final validation loss", False, "disadvantage", "advantage", per_layer=False),
)


@dataclass(frozen=True)
class FinishedRun:
    sweep: str
    arm: str
    seed: int
    num_experts: int
    records: list = field(hash=False, compare=False)


def arm_of(run_name: str) -> str:
    """``mask_seed=0`` -> ``mask``."""
    return run_name.rsplit("_seed=", 1)[0]


def load_finished(configs: Path) -> tuple[dict[str, int | None], list[FinishedRun]]:
    """Every finished run of the ladder sweeps, and per sweep how many (None: no sweep file)."""
    counts, finished = {}, []
    for name in SWEEPS:
        path = configs / f"{name}.yaml"
        if not path.is_file():
            counts[name] = None
            continue
        sweep = load_sweep(path)
        runs = [run for run in sweep.runs if is_complete(sweep, run)]
        for run in runs:
            cfg = run_config(sweep, run)
            finished.append(FinishedRun(sweep.name, arm_of(run.name), cfg.train.seed, cfg.moe.num_experts,
                                        run_records(sweep, run)))
        counts[name] = len(runs)
    return counts, finished


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def layer_metrics(records: list[dict], layer: int, num_experts: int) -> dict:
    """One layer's numbers of one run (None where the run did not log the field)."""
    last_step = records[-1]["step"]
    logged = [(r["step"], r["moe"][layer]) for r in records if len(r.get("moe") or []) > layer]
    tail = [(step, m) for step, m in logged if step > last_step - TAIL_STEPS]

    def series(entries, key):
        return [(step, m[key]) for step, m in entries if m.get(key) is not None]

    dead = series(logged, "dead_experts")
    return {"zero_token_area": curve_area(series(logged, "zero_token_experts"), normalise=True),
            "dead_last100": _mean(v for _, v in series(tail, "dead_experts")),
            "dead_last": dead[-1][1] if dead and dead[-1][0] == logged[-1][0] else None,
            "steps_to_threshold": steps_to_threshold(records, layer, num_experts, for_good=True),
            "partner_mean": _mean(v for _, v in series(logged, "partner_co_selection")),
            "partner_last100": _mean(v for _, v in series(tail, "partner_co_selection")),
            "changed_share": gatepro_changed_fraction([{"moe": [m]} for _, m in logged])}


def run_rows(finished: list[FinishedRun]) -> list[dict]:
    """``runs.csv``: one row per run and layer."""
    rows = []
    for run in finished:
        val_loss = final_val_loss(run.records)
        layers = max(len(r.get("moe") or []) for r in run.records)
        for layer in range(layers):
            rows.append({"sweep": run.sweep, "arm": run.arm, "seed": run.seed, "layer": layer,
                         "steps": run.records[-1]["step"],
                         **layer_metrics(run.records, layer, run.num_experts), "final_val_loss": val_loss})
    return rows


def _value(row: dict, metric: Metric):
    if metric.key == "steps_to_threshold" and row[metric.key] is None:
        return row["steps"] + 1  # never: censored at the end of the run
    return row[metric.key]


def seed_pairs(rows: list[dict], comparison: Comparison) -> list[int]:
    """The seeds both arms of ``comparison`` finished."""
    def seeds(sweep, arm):
        return {row["seed"] for row in rows if row["sweep"] == sweep and row["arm"] == arm}
    return sorted(seeds(comparison.sweep, comparison.arm) & seeds(comparison.control_of, comparison.control))


def paired_rows(rows: list[dict], comparisons=COMPARISONS, metrics=METRICS) -> list[dict]:
    """``paired.csv``: per comparison, metric and layer, the interval of the paired differences."""
    out = []
    for comparison in comparisons:
        seeds = seed_pairs(rows, comparison)
        arm = {(r["seed"], r["layer"]): r for r in rows if r["sweep"] == comparison.sweep and r["arm"] == comparison.arm}
        control = {(r["seed"], r["layer"]): r for r in rows
                   if r["sweep"] == comparison.control_of and r["arm"] == comparison.control}
        layers = sorted({layer for seed, layer in arm if seed in seeds})
        for metric in metrics:
            for layer in layers if metric.per_layer else layers[:1]:
                pairs = [(_value(arm[s, layer], metric), _value(control[s, layer], metric))
                         for s in seeds if (s, layer) in control]
                pairs = [(a, c) for a, c in pairs if a is not None and c is not None]
                if not pairs:
                    continue
                a, c = [p[0] for p in pairs], [p[1] for p in pairs]
                interval = paired_interval(c, a) if metric.control_minus_arm else paired_interval(a, c)
                excluded = excluded_effects(interval, metric.positive, metric.negative, metric.unit)
                out.append({"comparison": comparison.label, "metric": metric.key,
                            "layer": layer if metric.per_layer else ALL_LAYERS, "n": interval.n,
                            "arm_mean": statistics.fmean(a), "control_mean": statistics.fmean(c),
                            "difference": "control − arm" if metric.control_minus_arm else "arm − control",
                            "mean_diff": interval.mean, "sd": interval.sd, "ci_low": interval.low,
                            "ci_high": interval.high, "excludes_zero": excluded.excludes_zero,
                            "excluded": excluded.text})
    return out


def markdown(counts: dict[str, int | None], rows: list[dict], paired: list[dict], comparisons=COMPARISONS) -> str:
    labels = {metric.key: metric for metric in METRICS}
    lines = ["# Ladder experiments: paired comparisons", "",
             "Finished runs: " + ", ".join(f"{name} {'no sweep file' if n is None else n}" for name, n in counts.items())
             + ".", "",
             "Each difference is over the seeds both arms finished (paired by seed), with its 95% t-interval "
             "(mean ± t(n−1)·SD/√n). Sign convention: for the idle and step metrics and partner co-selection the "
             "difference is control − arm (positive = the arm spreads experts faster / has fewer idle / co-selects "
             "partners less); for validation loss and the changed share it is arm − control (a negative loss "
             f"difference = the arm is better). A layer that never got below {THRESHOLD:.0%} idle for good counts as "
             "its run's last step + 1. Below 2 pairs the interval is pending.", ""]
    for comparison in comparisons:
        seeds = seed_pairs(rows, comparison)
        of_it = [row for row in paired if row["comparison"] == comparison.label]
        lines += [f"## {comparison.label}", "",
                  f"{len(seeds)} seed pair{'s' * (len(seeds) != 1)}" + (f" (seeds {', '.join(map(str, seeds))})." if seeds
                                                                        else ": nothing to compare yet."), ""]
        if not of_it:
            continue
        lines += ["| metric | layer | n | arm | control | difference | mean ± SD | 95% CI | excludes 0 | the interval excludes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in of_it:
            interval = "pending" if row["ci_low"] is None else f"[{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
            spread = "" if row["sd"] is None else f" ± {fmt(row['sd'])}"
            lines.append(f"| {labels[row['metric']].label} | {row['layer']} | {row['n']} | {fmt(row['arm_mean'])} | "
                         f"{fmt(row['control_mean'])} | {row['difference']} | {fmt(row['mean_diff'])}{spread} | "
                         f"{interval} | {'—' if row['ci_low'] is None else 'yes' if row['excludes_zero'] else 'no'} | "
                         f"{row['excluded']} |")
        lines.append("")
    return "\n".join(lines)


def plot_groups(finished: list[FinishedRun], comparisons=COMPARISONS) -> dict[str, dict[str, list[list[dict]]]]:
    """Per sweep with a finished run, its arms' record lists (one per seed), plus the controls its
    comparisons take from another sweep (labelled with that sweep)."""
    groups: dict[str, dict[str, list[list[dict]]]] = {}
    for run in finished:
        groups.setdefault(run.sweep, {}).setdefault(run.arm, []).append(run.records)
    for comparison in comparisons:
        if comparison.control_sweep is not None and comparison.sweep in groups:
            borrowed = [run.records for run in finished
                        if run.sweep == comparison.control_sweep and run.arm == comparison.control]
            if borrowed:
                groups[comparison.sweep][f"{comparison.control_sweep} {comparison.control}"] = borrowed
    return groups


# (file, y label, the per-layer field; None: validation loss, one panel per sweep)
PLOTS = (("zero_token.png", "zero-token experts", "zero_token_experts"),
         ("dead_experts.png", "dead experts", "dead_experts"),
         ("partner_co_selection.png", "partner co-selection", "partner_co_selection"),
         ("val_loss.png", "validation loss", None))


def _curve_value(key: str | None, layer: int):
    def value(record):
        moe = record.get("moe") or []
        return record.get("val_loss") if key is None else moe[layer].get(key) if len(moe) > layer else None
    return value


def plots(out: Path, groups: dict[str, dict[str, list[list[dict]]]]) -> list[str]:
    """Write the plots whose numbers some finished run logged; return their file names."""
    from matplotlib.figure import Figure

    records = [r for arms in groups.values() for members in arms.values() for run in members for r in run]
    layers = max((len(r.get("moe") or []) for r in records), default=0)
    written = []
    for name, ylabel, key in PLOTS:
        columns = 1 if key is None else layers
        if not columns or all(_curve_value(key, 0)(r) is None for r in records):
            (out / name).unlink(missing_ok=True)  # no stale plot of an earlier report
            continue
        fig = Figure(figsize=(4.5 * columns, 3.4 * len(groups)), layout="constrained")
        axes = fig.subplots(len(groups), columns, squeeze=False)
        for row, (sweep, arms) in enumerate(groups.items()):
            for column in range(columns):
                ax = axes[row, column]
                for i, (arm, members) in enumerate(arms.items()):
                    plot_band(ax, members, _curve_value(key, column),
                              f"{arm} ({len(members)} seed{'s' * (len(members) > 1)})", f"C{i % 10}")
                ax.set(title=sweep if key is None else f"{sweep}, layer {column}", xlabel="step", ylabel=ylabel)
            axes[row, 0].legend(fontsize=6)
        fig.savefig(out / name, dpi=100)
        written.append(name)
    return written


def build(configs: Path, out: Path) -> dict[str, int | None]:
    """Write every table and plot; return how many finished runs each sweep contributed."""
    counts, finished = load_finished(configs)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_rows(finished)
    paired = paired_rows(rows)
    write_csv(out / "runs.csv", rows)
    write_csv(out / "paired.csv", paired)
    (out / "summary.md").write_text(markdown(counts, rows, paired))
    plots(out, plot_groups(finished))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ladder_report", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/sweeps", help="folder of the ladder_*.yaml sweep files")
    parser.add_argument("--out", default="docs/results/ladder", help="where the tables and plots go")
    args = parser.parse_args(argv)
    counts = build(Path(args.configs), Path(args.out))
    print("finished runs: " + ", ".join(f"{name} {'(no sweep file)' if n is None else n}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""When does GatePro act? The tables and plots of docs/RESULTS.md from the `when_*` sweeps.

    python -m gatepro_dist.experiments.when_report [--out docs/results/when]

Reads every finished run of ``configs/sweeps/when_init0.yaml``, ``when_default_init.yaml``,
``when_default_init_seeds.yaml``, ``when_lambda.yaml`` and ``when_hotswap.yaml`` (from the run
directories or the sweeps' archive) and writes, under ``--out``:

- ``zero_token.png``: the paper's Figure 4 in miniature, zero-token experts per layer against step;
  one line per (init, router, balance loss), mean over seeds with a min-to-max band.
- ``steps_to_threshold.csv``: per run and layer, the step from which fewer than ``THRESHOLD``
  (20%) of the layer's experts received no token until the end (``layer<i>``), and the step at
  which that first happened (``first_layer<i>``); empty if it never did.
- ``paired.csv``: the same, GatePro against the baseline with the same init, seed and balance loss.
- ``margin.png`` and ``lambda.csv``: the share of tokens whose k-th and (k+1)-th logits are closer
  than λ (the decisions GatePro can change) against step, and the λ sweep's summary.
- ``hotswap.csv``: GatePro never / first 25% / first 50% / always, per seed.
- ``val_loss.png``: validation loss of the init-0 groups.
- ``summary.md``: the paired comparison per init (per layer: steps to the threshold with GatePro
  and without, the difference, how many seeds agree), every default-init run, the λ table and the
  hot-swap table, in Markdown.

Missing runs are left out (a sweep still running shows what has finished); every table says how
many runs it holds.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from .sweep import Run, Sweep, load_sweep, run_config, run_records
from ..train.report import gatepro_changed_fraction, mean_below_penalty
from .sweep_report import plot_band

THRESHOLD = 0.2  # "experts in use": fewer than 20% of a layer's experts received no token
SWEEPS = ("when_init0", "when_default_init", "when_default_init_seeds", "when_lambda", "when_hotswap")
INITS = (("when_init0", "0"), ("when_default_init", "default"), ("when_default_init_seeds", "default"))


def steps_to_threshold(records: list[dict], layer: int, num_experts: int, threshold: float = THRESHOLD,
                       for_good: bool = False):
    """The step at which layer ``layer`` first had fewer than ``threshold * num_experts``
    zero-token experts (``for_good``: from which it stayed below until the last step); None if
    it never did (or, ``for_good``, was above again at the last step).

    Both matter at router init 0: the count first dips within ~20 steps, while the learning rate
    is still small, then the experts collapse again as it warms up; "for good" is when usage
    really spread."""
    limit = threshold * num_experts
    counts = [(r["step"], r["moe"][layer]["zero_token_experts"]) for r in records if len(r.get("moe") or []) > layer]
    if not for_good:
        return next((step for step, count in counts if count < limit), None)
    since = None
    for step, count in counts:
        if count >= limit:
            since = None
        elif since is None:
            since = step
    return since


def final_val_loss(records: list[dict]):
    values = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    return values[-1] if values else None


def _axis(run: Run, key: str, default=None):
    return run.axes.get(key, default)


def _penalty(run: Run) -> float:
    """The λ a run trained with: 0 when GatePro was off."""
    return _axis(run, "router.gatepro.penalty", 1e-4) if _axis(run, "router.gatepro.enabled", True) else 0.0


def _finished(sweep: Sweep) -> list[tuple[Run, list[dict]]]:
    out = []
    for run in sweep.runs:
        records = run_records(sweep, run)
        if records and records[-1].get("step", 0) >= _steps(sweep, run):
            out.append((run, records))
    return out


def _steps(sweep: Sweep, run: Run) -> int:
    return run_config(sweep, run).train.steps


def _experts(sweep: Sweep, run: Run) -> int:
    return run_config(sweep, run).moe.num_experts


def fmt(value) -> str:
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.unlink(missing_ok=True)
        return
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: fmt(v) for k, v in row.items()} for row in rows)


def _label(init: str, gatepro: bool, aux: float) -> str:
    return f"init {init}, {'GatePro' if gatepro else 'baseline'}, balance {aux}"


def build(configs: Path, out: Path) -> dict[str, int]:
    """Write every table and plot; return how many finished runs each sweep contributed."""
    sweeps = {name: load_sweep(configs / f"{name}.yaml") for name in SWEEPS}
    done = {name: _finished(sweep) for name, sweep in sweeps.items()}
    out.mkdir(parents=True, exist_ok=True)

    # Steps to threshold, per run and layer, for the init sweeps.
    rows, curves = [], {}
    for name, init in INITS:
        for run, records in done[name]:
            layers = len(records[0].get("moe", []))
            cfg = run_config(sweeps[name], run)  # a setting may be an axis or a fixed override
            gatepro, aux = cfg.router.gatepro.enabled, cfg.router.aux_loss_coef
            experts = cfg.moe.num_experts
            curves.setdefault(_label(init, gatepro, aux), []).append(records)
            rows.append({"sweep": name, "run": run.name, "init": init, "gatepro": gatepro,
                         "aux_loss_coef": aux, "seed": cfg.train.seed,
                         "steps": records[-1]["step"],
                         **{f"layer{i}": steps_to_threshold(records, i, experts, for_good=True) for i in range(layers)},
                         **{f"first_layer{i}": steps_to_threshold(records, i, experts) for i in range(layers)},
                         "final_val_loss": final_val_loss(records),
                         "idle_at_end": statistics.fmean(m["zero_token_experts"] for m in records[-1]["moe"]),
                         "first_below_penalty": mean_below_penalty(next(r for r in records if r.get("moe"))),
                         "gatepro_changed_fraction": gatepro_changed_fraction(records)})
    write_csv(out / "steps_to_threshold.csv", rows)

    paired = []
    for row in rows:
        if not row["gatepro"]:
            continue
        base = next((b for b in rows if b["init"] == row["init"] and not b["gatepro"] and b["seed"] == row["seed"]
                     and b["aux_loss_coef"] == row["aux_loss_coef"]), None)
        if base is None:
            continue
        layer_keys = [k for k in row if k.startswith(("layer", "first_layer"))]
        paired.append({"init": row["init"], "aux_loss_coef": row["aux_loss_coef"], "seed": row["seed"], "steps": row["steps"],
                       **{f"{k}_gatepro": row[k] for k in layer_keys}, **{f"{k}_baseline": base[k] for k in layer_keys},
                       "val_loss_gatepro": row["final_val_loss"], "val_loss_baseline": base["final_val_loss"]})
    write_csv(out / "paired.csv", paired)

    lam = []
    # λ = 0 is the baseline of the same seed (GatePro off): the reference for the other rows.
    lam_runs = sorted(done["when_lambda"] + [(r, rec) for r, rec in done["when_init0"]
                                             if _axis(r, "train.seed") == 0 and _axis(r, "router.aux_loss_coef") == 0.01],
                      key=lambda item: _penalty(item[0]))
    for run, records in lam_runs:
        cfg_penalty = _penalty(run)
        experts = _experts(sweeps["when_init0"], run)
        layers = len(records[0].get("moe", []))
        margin_steps = [r for r in records if mean_below_penalty(r) is not None]
        configured = _axis(run, "router.gatepro.penalty", 1e-4)  # the margin statistic's λ, also when off
        lam.append({"penalty": cfg_penalty, "run": run.name,
                    "label": f"{cfg_penalty:g}" if cfg_penalty else f"0 (off; margins against {configured:g})",
                    "below_penalty_step1": mean_below_penalty(margin_steps[0]) if margin_steps else None,
                    "below_penalty_step100": next((mean_below_penalty(r) for r in margin_steps if r["step"] == 100), None),
                    "below_penalty_last": mean_below_penalty(margin_steps[-1]) if margin_steps else None,
                    "gatepro_changed_fraction": gatepro_changed_fraction(records),
                    **{f"layer{i}": steps_to_threshold(records, i, experts, for_good=True) for i in range(layers)},
                    "final_val_loss": final_val_loss(records)})
    write_csv(out / "lambda.csv", lam)

    swap = []
    controls = [(r, rec) for r, rec in done["when_init0"] if _axis(r, "router.aux_loss_coef") == 0.01]
    for run, records in controls + done["when_hotswap"]:
        schedule = _axis(run, "router.gatepro.schedule")
        when = ("always" if _axis(run, "router.gatepro.enabled") else "never") if schedule is None \
            else f"first {schedule[-1][0]} steps"
        experts = _experts(sweeps["when_init0"], run)
        layers = len(records[0].get("moe", []))
        tail = records[-max(1, len(records) // 10):]
        swap.append({"gatepro": when, "seed": _axis(run, "train.seed", 0),
                     "final_val_loss": final_val_loss(records),
                     "loss_last10pct": statistics.fmean(r["loss"] for r in tail),
                     "zero_token_mean": statistics.fmean(sum(m["zero_token_experts"] for m in r["moe"]) / len(r["moe"])
                                                         for r in records if r.get("moe")),
                     **{f"layer{i}": steps_to_threshold(records, i, experts, for_good=True) for i in range(layers)}})
    swap.sort(key=lambda row: (row["gatepro"], row["seed"]))
    write_csv(out / "hotswap.csv", swap)

    _plots(out, curves, lam_runs)
    counts = {name: len(runs) for name, runs in done.items()}
    (out / "summary.md").write_text(_markdown(counts, paired, [r for r in rows if r["init"] == "default"], lam, swap))
    return counts


def _steps_text(value) -> str:
    return "never" if value is None else str(value)


def _layer_keys(row: dict) -> list[str]:
    return sorted((k for k in row if k.startswith("layer")), key=lambda k: int(k[len("layer"):]))


def _layer_range(rows: list[dict]) -> str:
    keys = _layer_keys(rows[0])
    return f"{keys[0][len('layer'):]}–{keys[-1][len('layer'):]}" if keys else ""


def _layer_steps(row: dict) -> str:
    return " / ".join(_steps_text(row[k]) for k in _layer_keys(row))


def _paired_tables(paired: list[dict], prefix: str, what: str) -> list[str]:
    layers = sorted({k[: -len("_gatepro")] for k in paired[0] if k.startswith(prefix) and k.endswith("_gatepro")},
                    key=lambda k: int(k[len(prefix):]))
    names = [f"layer {k[len(prefix):]}" for k in layers]
    lines = [f"The step {what} (router init {paired[0]['init']}), GatePro / baseline, paired by seed:", "",
             "| balance loss | seed | " + " | ".join(names) + " | final val loss, GatePro / baseline |",
             "|---|---|" + "---|" * len(layers) + "---|"]
    for row in paired:
        cells = [f"{_steps_text(row[f'{k}_gatepro'])} / {_steps_text(row[f'{k}_baseline'])}" for k in layers]
        lines.append(f"| {row['aux_loss_coef']} | {row['seed']} | " + " | ".join(cells)
                     + f" | {fmt(row['val_loss_gatepro'])} / {fmt(row['val_loss_baseline'])} |")
    lines += ["", "Mean over seeds of (baseline − GatePro) steps, and the seeds where GatePro got there first:", "",
              "| balance loss | seeds | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(layers)]
    for aux in sorted({row["aux_loss_coef"] for row in paired}, reverse=True):
        rows = [row for row in paired if row["aux_loss_coef"] == aux]
        cells = []
        for k in layers:
            diffs = [(row[f"{k}_baseline"] or row["steps"] + 1) - (row[f"{k}_gatepro"] or row["steps"] + 1)
                     for row in rows]
            cells.append(f"{statistics.fmean(diffs):+.0f} ({sum(d > 0 for d in diffs)}/{len(diffs)} sooner)")
        lines.append(f"| {aux} | {len(rows)} | " + " | ".join(cells) + " |")
    return lines + [""]


def _markdown(counts: dict[str, int], paired: list[dict], default: list[dict], lam: list[dict], swap: list[dict]) -> str:
    """The RESULTS tables. A layer that never reached the threshold counts as the run's last
    step + 1 in a difference, and the cell says so ("never")."""
    lines = ["Finished runs: " + ", ".join(f"{name} {n}" for name, n in counts.items()) + ".", ""]
    for init in dict.fromkeys(init for _, init in INITS):
        of_init = [row for row in paired if row["init"] == init]
        for prefix, what in (("layer", "from which fewer than {t} of a layer's experts received no token until the end"),
                             ("first_layer", "at which fewer than {t} of a layer's experts first received no token")):
            if of_init:
                lines += _paired_tables(of_init, prefix, what.format(t=f"{THRESHOLD:.0%}"))
    if default:
        lines += ["The default router init (rows ~ N(0, 1/d)), every run:", "",
                  "| GatePro | balance loss | seed | share of tokens with margin < λ at step 1 | tokens whose set GatePro changed | "
                  f"step from which < {THRESHOLD:.0%} of experts idle, layers {_layer_range(default)} | "
                  "idle experts per layer at the end, mean | final val loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in sorted(default, key=lambda r: (-r["aux_loss_coef"], r["seed"], not r["gatepro"])):
            lines.append(f"| {'on' if row['gatepro'] else 'off'} | {row['aux_loss_coef']} | {row['seed']} | "
                         f"{fmt(row['first_below_penalty'])} | "
                         f"{fmt(row['gatepro_changed_fraction'])} | {_layer_steps(row)} | {fmt(row['idle_at_end'])} | "
                         f"{fmt(row['final_val_loss'])} |")
        lines.append("")
    if lam:
        lines += ["λ at router init 0 (balance loss 0.01, seed 0; λ = 0 is GatePro off):", "",
                  "| λ | share of tokens with margin < λ: step 1 / 100 / last | tokens whose set GatePro changed | "
                  f"step from which < {THRESHOLD:.0%} of experts idle, layers {_layer_range(lam)} | final val loss |",
                  "|---|---|---|---|---|"]
        for row in lam:
            lines.append(f"| {row['label']} | {fmt(row['below_penalty_step1'])} / {fmt(row['below_penalty_step100'])}"
                         f" / {fmt(row['below_penalty_last'])} | {fmt(row['gatepro_changed_fraction'])} | "
                         f"{_layer_steps(row)} | {fmt(row['final_val_loss'])} |")
        lines.append("")
    if swap:
        lines += ["Hot swap at router init 0 (balance loss 0.01):", "",
                  "| GatePro | seed | final val loss | training loss, last 10% | zero-token experts per layer, mean | "
                  f"step from which < {THRESHOLD:.0%} of experts idle, layers {_layer_range(swap)} |",
                  "|---|---|---|---|---|---|"]
        for row in swap:
            lines.append(f"| {row['gatepro']} | {row['seed']} | {fmt(row['final_val_loss'])} | "
                         f"{fmt(row['loss_last10pct'])} | {fmt(row['zero_token_mean'])} | {_layer_steps(row)} |")
        lines.append("")
    return "\n".join(lines)


def _band(ax, members: list[list[dict]], value, label: str, color, style="-") -> None:
    plot_band(ax, members, value, f"{label} ({len(members)} seed{'s' if len(members) > 1 else ''})", color, style)


def _plots(out: Path, curves: dict[str, list[list[dict]]], lam_runs: list[tuple[Run, list[dict]]]) -> None:
    from matplotlib.figure import Figure

    labels = sorted(curves)
    if curves:
        layers = max(len(members[0][0].get("moe", [])) for members in curves.values())
        fig = Figure(figsize=(16, 3.6), layout="constrained")
        axes = fig.subplots(1, layers, squeeze=False).ravel()
        for layer, ax in enumerate(axes):
            for i, label in enumerate(labels):
                _band(ax, curves[label], lambda r, k=layer: r["moe"][k]["zero_token_experts"] if r.get("moe") else None,
                      label, f"C{i}", "--" if "default" in label else "-")
            ax.set(title=f"layer {layer}", xlabel="step", ylabel="zero-token experts")
        axes[0].legend(fontsize=6)
        fig.savefig(out / "zero_token.png", dpi=110)

        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for i, label in enumerate(labels):
            if "init 0" in label:
                _band(ax, curves[label], lambda r: r.get("val_loss"), label, f"C{i}")
        ax.set(xlabel="step", ylabel="validation loss", title="Validation loss, router init 0")
        ax.legend(fontsize=6)
        fig.savefig(out / "val_loss.png", dpi=110)

    if lam_runs:
        fig = Figure(figsize=(6, 4), layout="constrained")
        ax = fig.subplots()
        for i, (run, records) in enumerate(lam_runs):
            label = (f"λ={_penalty(run):g}" if _penalty(run)
                     else f"GatePro off (margin < {_axis(run, 'router.gatepro.penalty', 1e-4):g})")
            _band(ax, [records], mean_below_penalty, label, f"C{i}")
        ax.set(xlabel="step", ylabel="share of tokens with margin < λ", yscale="log",
               title="Decisions GatePro can change (mean over layers)")
        ax.legend(fontsize=6)
        fig.savefig(out / "margin.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="when_report", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="configs/sweeps", help="folder of the when_*.yaml sweep files")
    parser.add_argument("--out", default="docs/results/when", help="where the tables and plots go")
    args = parser.parse_args(argv)
    counts = build(Path(args.configs), Path(args.out))
    print("finished runs: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

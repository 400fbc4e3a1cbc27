"""Turn a run's ``metrics.jsonl`` into PNG plots and a ``report.md`` that embeds them.

    python -m gatepro_dist.train.report RUN_DIR

Plots (written into RUN_DIR, linked from report.md by relative path):

- ``loss.png``               training loss and validation loss vs step;
- ``zero_token_experts.png`` experts that received no token, one line per MoE layer (the GatePro
                             paper's main figure);
- ``expert_load.png``        fraction of routed tokens per expert, layers x experts, averaged over
                             the last ~10% of logged steps;
- ``similarity.png``         mean cosine similarity of the router rows per layer (only when the
                             records carry similarity stats).

Vertical dashed lines mark the steps where the GatePro schedule switched it on or off.
Record fields read: step, loss, val_loss, tokens_per_s, gatepro, and in each ``moe`` entry:
layer, zero_token_experts, dead_experts, partner_co_selection, tokens_per_expert, similarity.mean_cos.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from gatepro_dist.train.metrics import METRICS_FILE, read_metrics

REPORT_FILE = "report.md"
CONFIG_FILE = "config.yaml"
LOSS_PNG = "loss.png"
ZERO_TOKEN_PNG = "zero_token_experts.png"
EXPERT_LOAD_PNG = "expert_load.png"
SIMILARITY_PNG = "similarity.png"

LOAD_WINDOW_FRACTION = 0.1  # the expert-load heatmap averages the last 10% of logged steps


# ------------------------------------------------------------------------------------ extraction

Series = tuple[list[int], list[float]]  # (steps, values)


def _top_level_series(records: list[dict], name: str) -> Series:
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _layer_series(records: list[dict], name: str, stat: str | None = None) -> dict[int, Series]:
    """``{layer: (steps, values)}`` of ``moe[i][name]`` (or ``moe[i][name][stat]``)."""
    series: dict[int, Series] = {}
    for record in records:
        for position, layer_stats in enumerate(record.get("moe") or []):
            value = layer_stats.get(name)
            if stat is not None:
                value = value.get(stat) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = series.setdefault(layer_stats.get("layer", position), ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return dict(sorted(series.items()))


def _gatepro_switches(records: list[dict]) -> list[tuple[int, bool]]:
    """``(step, new_state)`` for every step where ``gatepro`` differs from the previous record."""
    switches, previous = [], None
    for record in records:
        state = record.get("gatepro")
        if not isinstance(state, bool):
            continue
        if previous is not None and state != previous:
            switches.append((record["step"], state))
        previous = state
    return switches


@dataclass(frozen=True)
class ExpertLoad:
    fraction_LE: np.ndarray  # layers x experts, fraction of the layer's routed tokens (NaN = none)
    layers: list[int]
    caption: str


def _expert_load(records: list[dict]) -> ExpertLoad | None:
    with_counts = [r for r in records if any("tokens_per_expert" in m for m in r.get("moe") or [])]
    if not with_counts:
        return None
    window = max(1, math.ceil(LOAD_WINDOW_FRACTION * len(with_counts)))
    recent = with_counts[-window:]
    per_layer: dict[int, list[np.ndarray]] = {}
    for record in recent:
        for position, layer_stats in enumerate(record["moe"]):
            counts_E = np.asarray(layer_stats.get("tokens_per_expert", []), dtype=np.float64)
            if counts_E.size == 0:
                continue
            total = counts_E.sum()
            fraction_E = counts_E / total if total > 0 else np.zeros_like(counts_E)
            per_layer.setdefault(layer_stats.get("layer", position), []).append(fraction_E)
    layers = sorted(per_layer)
    num_experts = max(len(f) for fractions in per_layer.values() for f in fractions)
    fraction_LE = np.full((len(layers), num_experts), np.nan)
    for row, layer in enumerate(layers):
        fraction_E = np.mean(per_layer[layer], axis=0)
        fraction_LE[row, : len(fraction_E)] = fraction_E
    first, last = recent[0]["step"], recent[-1]["step"]
    if window == 1:
        caption = f"from the last logged step (step {last})"
    else:
        caption = (
            f"averaged over the last {window} logged steps (steps {first}–{last}, "
            f"the last ~{LOAD_WINDOW_FRACTION:.0%} of the run)"
        )
    return ExpertLoad(fraction_LE, layers, caption)


# ---------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class RunSummary:
    num_records: int
    first_step: int
    last_step: int
    final_loss: tuple[int, float] | None  # (step, value)
    final_val_loss: tuple[int, float] | None
    best_val_loss: tuple[int, float] | None
    mean_tokens_per_s: float | None  # plain mean over every record that has tokens_per_s
    final_zero_token_experts: dict[int, int] = field(default_factory=dict)
    num_experts: dict[int, int] = field(default_factory=dict)  # per layer, from tokens_per_expert
    gatepro_final: bool | None = None
    gatepro_switches: list[tuple[int, bool]] = field(default_factory=list)
    final_margin: dict[int, dict] = field(default_factory=dict)  # per layer: routing_margin of the last step
    topk_changed_fraction: float | None = None  # tokens whose set GatePro changed / tokens routed, all steps
    final_dead_experts: dict[int, int] = field(default_factory=dict)  # per layer, last step (last 10 steps' shares)
    partner_co_selection: dict[int, float] = field(default_factory=dict)  # per layer, mean over the logged steps


def summarize(records: list[dict]) -> RunSummary:
    loss_steps, losses = _top_level_series(records, "loss")
    val_steps, val_losses = _top_level_series(records, "val_loss")
    _, tokens_per_s = _top_level_series(records, "tokens_per_s")
    best_val = None
    if val_losses:
        best = int(np.argmin(val_losses))
        best_val = (val_steps[best], val_losses[best])
    last_moe = next((r["moe"] for r in reversed(records) if r.get("moe")), [])
    zero_token = {
        m.get("layer", i): int(m["zero_token_experts"])
        for i, m in enumerate(last_moe)
        if "zero_token_experts" in m
    }
    num_experts = {
        m.get("layer", i): len(m["tokens_per_expert"])
        for i, m in enumerate(last_moe)
        if "tokens_per_expert" in m
    }
    states = [r["gatepro"] for r in records if isinstance(r.get("gatepro"), bool)]
    final_margin = {m.get("layer", i): m["routing_margin"] for i, m in enumerate(last_moe) if m.get("routing_margin")}
    return RunSummary(
        num_records=len(records),
        first_step=records[0]["step"],
        last_step=records[-1]["step"],
        final_loss=(loss_steps[-1], losses[-1]) if losses else None,
        final_val_loss=(val_steps[-1], val_losses[-1]) if val_losses else None,
        best_val_loss=best_val,
        mean_tokens_per_s=float(np.mean(tokens_per_s)) if tokens_per_s else None,
        final_zero_token_experts=dict(sorted(zero_token.items())),
        num_experts=num_experts,
        gatepro_final=states[-1] if states else None,
        gatepro_switches=_gatepro_switches(records),
        final_margin=dict(sorted(final_margin.items())),
        topk_changed_fraction=gatepro_changed_fraction(records),
        final_dead_experts={m.get("layer", i): int(m["dead_experts"]) for i, m in enumerate(last_moe)
                            if "dead_experts" in m},
        partner_co_selection=_mean_per_layer(records, "partner_co_selection"),
    )


def _mean_per_layer(records: list[dict], name: str) -> dict[int, float]:
    """``name`` of each MoE layer, averaged over the records that carry it."""
    return {layer: float(np.mean(values)) for layer, (_, values) in sorted(_layer_series(records, name).items())}


def mean_below_penalty(record: dict) -> float | None:
    """Share of tokens whose routing margin is below GatePro's penalty, averaged over the record's
    MoE layers; None when the record has no margin."""
    values = [m["routing_margin"]["below_penalty"] for m in record.get("moe", []) if m.get("routing_margin")]
    return sum(values) / len(values) if values else None


def gatepro_changed_fraction(records: list[dict]) -> float | None:
    """Tokens whose expert set GatePro changed over the tokens routed, all steps and layers."""
    layers = [m for r in records for m in r.get("moe", []) if m.get("routing_margin")]
    routed = sum(m["routing_margin"]["tokens"] for m in layers)
    return sum(m.get("gatepro_topk_changed", 0) for m in layers) / routed if routed else None


def _on_off(state: bool) -> str:
    return "on" if state else "off"


def _summary_table(s: RunSummary) -> str:
    def at_step(entry: tuple[int, float] | None) -> str:
        return "—" if entry is None else f"{entry[1]:.4f} (step {entry[0]})"

    zero_token = ", ".join(
        f"layer {layer}: {count}" + (f"/{s.num_experts[layer]}" if layer in s.num_experts else "")
        for layer, count in s.final_zero_token_experts.items()
    )
    if s.gatepro_final is None:
        gatepro = "not recorded"
    else:
        gatepro = _on_off(s.gatepro_final) + " at the last step"
        if s.gatepro_switches:
            gatepro += "; switched " + ", ".join(
                f"{_on_off(not state)}→{_on_off(state)} at step {step}"
                for step, state in s.gatepro_switches
            )
    rows = [
        ("steps", f"{s.first_step}–{s.last_step} ({s.num_records} logged records)"),
        ("final loss", at_step(s.final_loss)),
        ("final val loss", at_step(s.final_val_loss)),
        ("best val loss", at_step(s.best_val_loss)),
        ("mean tokens/s", "—" if s.mean_tokens_per_s is None else f"{s.mean_tokens_per_s:,.0f}"),
        ("final zero-token experts", zero_token or "—"),
        ("GatePro", gatepro),
        ("routing margin, last step", ", ".join(
            f"layer {layer}: {m['below_penalty']:.2%} below the penalty, median {m['p50']:.2g}"
            for layer, m in s.final_margin.items()) or "—"),
        ("tokens whose experts GatePro changed", "—" if s.topk_changed_fraction is None
         else f"{s.topk_changed_fraction:.3g} of tokens routed, over all steps and layers"),
        ("dead experts, last step (share < 0.1/N over its last 10 steps)", ", ".join(
            f"layer {layer}: {count}" for layer, count in s.final_dead_experts.items()) or "—"),
        ("tokens with an expert and its most similar partner (mean over steps)", ", ".join(
            f"layer {layer}: {share:.1%}" for layer, share in s.partner_co_selection.items()) or "—"),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows])


# ------------------------------------------------------------------------------------------ plots


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render off-screen; never touch pyplot's global backend
    return figure


def _layer_colors(num_layers: int) -> list:
    # Few layers: distinct hues. Many: a sequential map, so depth reads as colour.
    if num_layers <= 10:
        return [f"C{i}" for i in range(num_layers)]
    from matplotlib import colormaps

    return [colormaps["viridis"](0.9 * i / (num_layers - 1)) for i in range(num_layers)]


def _mark_switches(ax, switches: list[tuple[int, bool]]) -> None:
    for i, (step, state) in enumerate(switches):
        ax.axvline(step, color="0.4", linestyle="--", linewidth=1,
                   label="GatePro switched" if i == 0 else None)
        ax.annotate(f"GatePro {_on_off(state)}", xy=(step, 1), xycoords=("data", "axes fraction"),
                    xytext=(3, -3), textcoords="offset points", va="top", fontsize="small",
                    color="0.3")


def _plot_per_layer(ax, series: dict[int, Series]) -> None:
    for color, (layer, (steps, values)) in zip(_layer_colors(len(series)), series.items()):
        ax.plot(steps, values, color=color, label=f"layer {layer}")


def _finish(ax, figure: Figure, path: Path, legend_title: str | None = None, entries: int = 1):
    ax.grid(alpha=0.3)
    if entries <= 6:
        ax.legend(title=legend_title, fontsize="small")
    else:  # many layers: keep the legend off the curves
        ax.legend(title=legend_title, fontsize="small", ncol=math.ceil(entries / 20),
                  loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    figure.savefig(path, dpi=120)


def _plot_loss(records: list[dict], switches, path: Path) -> None:
    figure = _new_figure(7, 4)
    ax = figure.add_subplot()
    steps, losses = _top_level_series(records, "loss")
    ax.plot(steps, losses, label="training loss", linewidth=1)
    val_steps, val_losses = _top_level_series(records, "val_loss")
    if val_losses:
        ax.plot(val_steps, val_losses, "o-", label="validation loss", markersize=4)
    _mark_switches(ax, switches)
    ax.set(xlabel="step", ylabel="loss", title="Training and validation loss")
    _finish(ax, figure, path)


def _plot_zero_token(series: dict[int, Series], num_experts: int | None, switches, path: Path):
    figure = _new_figure(7, 4)
    ax = figure.add_subplot()
    _plot_per_layer(ax, series)
    _mark_switches(ax, switches)
    of = f" (of {num_experts})" if num_experts else ""
    ax.set(xlabel="step", ylabel=f"experts with zero tokens{of}",
           title="Zero-token experts per MoE layer")
    ax.set_ylim(bottom=0, top=num_experts if num_experts else None)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _finish(ax, figure, path, legend_title="MoE layer", entries=len(series))


def _plot_similarity(series: dict[int, Series], switches, path: Path) -> None:
    figure = _new_figure(7, 4)
    ax = figure.add_subplot()
    _plot_per_layer(ax, series)
    _mark_switches(ax, switches)
    ax.set(xlabel="step", ylabel="mean cosine similarity",
           title="Mean cosine similarity between router rows")
    _finish(ax, figure, path, legend_title="MoE layer", entries=len(series))


def _plot_expert_load(load: ExpertLoad, path: Path) -> None:
    num_layers, num_experts = load.fraction_LE.shape
    figure = _new_figure(min(max(6.0, 0.08 * num_experts + 3), 12), max(2.5, 0.3 * num_layers + 1.5))
    ax = figure.add_subplot()
    image = ax.imshow(load.fraction_LE, aspect="auto", cmap="viridis", vmin=0,
                      interpolation="nearest")
    ax.set_yticks(range(num_layers), [str(layer) for layer in load.layers])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="expert", ylabel="MoE layer", title="Expert load (fraction of routed tokens)")
    figure.colorbar(image, ax=ax, label=f"fraction (uniform = 1/{num_experts})")
    figure.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------- report


def write_report(run_dir: str | Path) -> Path:
    """Write the plots and ``report.md`` into ``run_dir``; returns the path of report.md.

    Raises ValueError naming the file when ``run_dir/metrics.jsonl`` is missing or empty.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    summary = summarize(records)
    switches = summary.gatepro_switches
    num_experts = max(summary.num_experts.values(), default=None)

    sections = [f"# Run report: `{run_dir.resolve().name}`", "", _summary_table(summary), ""]

    _plot_loss(records, switches, run_dir / LOSS_PNG)
    sections += ["## Loss", "", f"![Training and validation loss]({LOSS_PNG})", ""]

    zero_token = _layer_series(records, "zero_token_experts")
    if zero_token:
        _plot_zero_token(zero_token, num_experts, switches, run_dir / ZERO_TOKEN_PNG)
        sections += [
            "## Zero-token experts", "",
            f"![Zero-token experts per MoE layer]({ZERO_TOKEN_PNG})", "",
            "Experts that received no token in the step, per MoE layer "
            "(the GatePro paper's main figure; lower is better).", "",
        ]

    load = _expert_load(records)
    if load is not None:
        _plot_expert_load(load, run_dir / EXPERT_LOAD_PNG)
        sections += [
            "## Expert load", "", f"![Expert load heatmap]({EXPERT_LOAD_PNG})", "",
            f"Fraction of each layer's routed tokens per expert, {load.caption}.", "",
        ]

    similarity = _layer_series(records, "similarity", stat="mean_cos")
    if similarity:
        _plot_similarity(similarity, switches, run_dir / SIMILARITY_PNG)
        sections += [
            "## Router similarity", "", f"![Mean cosine similarity]({SIMILARITY_PNG})", "",
            "Mean pairwise cosine similarity of the router rows W_g, per MoE layer.", "",
        ]

    config_path = run_dir / CONFIG_FILE
    if config_path.is_file():
        sections += ["## Config", "", "```yaml", config_path.read_text().rstrip(), "```", ""]

    report_path = run_dir / REPORT_FILE
    report_path.write_text("\n".join(sections), encoding="utf-8")
    return report_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gatepro_dist.train.report",
        description="Regenerate report.md and its plots from RUN_DIR/metrics.jsonl.",
    )
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        report_path = write_report(args.run_dir)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

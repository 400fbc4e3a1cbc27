"""The ladder report on synthetic runs: per-layer numbers computed by hand, comparisons paired by
seed with the right sign and control, missing runs and fields left out, and the plots drawing the
seeds' mean."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest

from gatepro_dist.experiments.ladder_report import (ALL_LAYERS, Comparison, FinishedRun, build, layer_metrics,
                                                    paired_rows, run_rows)
from plots import assert_curve, assert_drawn, capture_figures

ROOT = Path(__file__).resolve().parent.parent
HALF = 4.303 / 3 ** 0.5  # the 95% half-width of differences [1, 2, 3]: t(2) · SD 1 / √3


def _records(steps=200, zero=lambda s: 2, dead=lambda s: 1, partner=lambda s: 0.2, changed=0, val=2.0, layers=2,
             new_fields=True):
    records = []
    for step in range(1, steps + 1):
        moe = []
        for _ in range(layers):
            layer = {"zero_token_experts": zero(step), "gatepro_topk_changed": changed,
                     "routing_margin": {"tokens": 100, "tied": 0.0, "below_penalty": 0.0, "p10": 0.0, "p50": 0.1, "p90": 0.5}}
            if new_fields:
                layer |= {"dead_experts": dead(step), "partner_co_selection": partner(step)}
            moe.append(layer)
        records.append({"step": step, "loss": 3.0, "lr": 1e-3, "moe": moe, **({"val_loss": val} if step % 100 == 0 else {})})
    return records


def test_layer_metrics_by_hand():
    records = _records(zero=lambda s: 10 if s <= 100 else 2,
                       dead=lambda s: 5 if s <= 100 else (4 if s % 2 else 0),
                       partner=lambda s: 0.5 if s <= 100 else 0.1, changed=10)
    got = layer_metrics(records, 1, num_experts=16)
    # trapezoid: 99 steps at 10, one step from 10 to 2, 99 steps at 2; over a span of 199 steps
    assert got["zero_token_area"] == pytest.approx((99 * 10 + 6 + 99 * 2) / 199)
    assert got["dead_last100"] == 2.0 and got["dead_last"] == 0  # steps 101..200 alternate 4, 0
    assert got["steps_to_threshold"] == 101  # 2 < 0.2 · 16 from step 101 to the end
    assert got["partner_mean"] == pytest.approx(0.3) and got["partner_last100"] == pytest.approx(0.1)
    assert got["changed_share"] == pytest.approx(0.1)


def test_older_runs_without_the_new_fields_leave_them_empty():
    got = layer_metrics(_records(new_fields=False), 0, num_experts=16)
    assert got["dead_last100"] is got["dead_last"] is got["partner_mean"] is got["partner_last100"] is None
    assert got["zero_token_area"] == 2.0


def _rows(sweep, arm, seeds, zero, val=2.0, steps_to=None):
    """run_rows of synthetic runs whose layers hold ``zero(seed)`` zero-token experts throughout."""
    return run_rows([FinishedRun(sweep, arm, seed, 16, _records(zero=lambda s, z=zero(seed): z, val=val + seed / 100))
                     for seed in seeds])


def test_paired_rows_sign_control_and_interval():
    rows = (_rows("s", "baseline", [0, 1, 2], lambda seed: 10) + _rows("s", "mask", [0, 1, 2], lambda seed: 9 - seed, val=1.9)
            + _rows("late", "late_mask", [1], lambda seed: 7))
    paired = paired_rows(rows, [Comparison("s", "mask", "baseline"), Comparison("late", "late_mask", "baseline", "s"),
                                Comparison("s", "random_mask", "baseline")])
    zero = [r for r in paired if r["comparison"] == "s: mask vs baseline" and r["metric"] == "zero_token_area"]
    assert [r["layer"] for r in zero] == [0, 1]
    for row in zero:  # baseline − mask = 1, 2, 3 idle experts fewer with the mask
        assert (row["n"], row["mean_diff"], row["sd"]) == (3, 2.0, 1.0)
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((2 - HALF, 2 + HALF), abs=1e-9)
        assert row["excludes_zero"] is False
        assert row["excluded"] == "excludes an advantage larger than 4.48 experts and a disadvantage larger than 0.484 experts"
    never = [r for r in paired if r["comparison"] == "s: mask vs baseline" and r["metric"] == "steps_to_threshold"]
    assert [(r["n"], r["arm_mean"], r["mean_diff"]) for r in never] == [(3, 201, 0.0)] * 2  # never: last step + 1
    val = [r for r in paired if r["comparison"] == "s: mask vs baseline" and r["metric"] == "final_val_loss"]
    assert len(val) == 1 and val[0]["layer"] == ALL_LAYERS
    assert val[0]["mean_diff"] == pytest.approx(-0.1) and val[0]["sd"] == pytest.approx(0, abs=1e-12)  # arm − control
    late = [r for r in paired if r["comparison"] == "late: late_mask vs s baseline"]
    assert {r["n"] for r in late} == {1} and late[0]["mean_diff"] == 3.0 and late[0]["ci_low"] is None
    assert late[0]["excluded"].startswith("pending")
    assert not [r for r in paired if "random_mask" in r["comparison"]]  # no finished run: no row


def _write_sweep(configs: Path, tmp_path: Path, name: str, arms: dict[str, str], seeds=(0, 1, 2), steps=200):
    lines = [f"name: {name}", "base: ../quickstart.yaml", f"out_dir: {tmp_path / 'runs' / name}",
             f"archive: {tmp_path / 'archive'}", "world: 2", f"overrides: [train.steps={steps}, router.init_std=0.0]", "runs:"]
    for arm, overrides in arms.items():
        for seed in seeds:
            lines.append(f"  - {{name: {arm}_seed={seed}, train.seed: {seed}{', ' + overrides if overrides else ''}}}")
    (configs / f"{name}.yaml").write_text("\n".join(lines) + "\n")


def _archive(tmp_path: Path, sweep: str, run: str, records: list[dict]) -> None:
    path = tmp_path / "archive" / sweep / f"{run}.jsonl.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def test_report_from_sweep_files_and_archives(tmp_path, monkeypatch):
    configs = tmp_path / "configs" / "sweeps"
    configs.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "configs")
    _write_sweep(configs, tmp_path, "ladder_init0", {"baseline": "router.gatepro.enabled: false",
                                                     "mask": "router.gatepro.mode: mask",
                                                     "random_mask": "router.gatepro.mode: mask, router.gatepro.pairing: random"})
    _write_sweep(configs, tmp_path, "ladder_late", {"late_mask": "router.gatepro.mode: mask, "
                                                                 "router.gatepro.schedule: [[0, false], [100, true]]"})
    for seed in (0, 1, 2):  # the mask idles 1, 2, 3 experts fewer than the baseline, reaches 20% idle 20·seed steps sooner
        _archive(tmp_path, "ladder_init0", f"baseline_seed={seed}",
                 _records(zero=lambda s: 10 if s < 150 else 2, dead=lambda s: 6, val=2.0))
        _archive(tmp_path, "ladder_init0", f"mask_seed={seed}",
                 _records(zero=lambda s, d=20 * seed: 9 - seed if s < 150 - d else 2, dead=lambda s: 4, val=2.1))
    _archive(tmp_path, "ladder_init0", "random_mask_seed=0", _records(val=2.2))
    _archive(tmp_path, "ladder_init0", "random_mask_seed=1", _records(steps=150))  # unfinished: left out
    metrics = tmp_path / "runs" / "ladder_late" / "late_mask_seed=0" / "metrics.jsonl"  # a run directory, no archive
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _records(zero=lambda s: 1, new_fields=False)))
    figures = capture_figures(monkeypatch)

    out = tmp_path / "out"
    counts = build(configs, out)
    assert counts == {"ladder_init0": 7, "ladder_default_init": None, "ladder_precision": None, "ladder_slow": None,
                      "ladder_late": 1}
    with open(out / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == 8 * 2  # finished runs x layers
    with open(out / "paired.csv") as fh:
        paired = {(r["comparison"], r["metric"], r["layer"]): r for r in csv.DictReader(fh)}
    steps = paired["ladder_init0: mask vs baseline", "steps_to_threshold", "0"]
    assert (steps["n"], float(steps["mean_diff"]), float(steps["sd"])) == ("3", 20.0, 20.0)  # 0, 20, 40 steps sooner
    assert float(steps["ci_high"]) == pytest.approx(20 + 4.303 * 20 / 3 ** 0.5, rel=1e-3)
    dead = paired["ladder_init0: mask vs baseline", "dead_last", "1"]
    assert (float(dead["mean_diff"]), float(dead["sd"])) == (2.0, 0.0)
    val = paired["ladder_init0: mask vs baseline", "final_val_loss", "all"]
    assert float(val["mean_diff"]) == pytest.approx(0.1) and val["excludes_zero"] == "True"  # worse, every seed
    assert paired["ladder_init0: mask vs random_mask", "zero_token_area", "0"]["n"] == "1"  # seed 1 unfinished
    late = paired["ladder_late: late_mask vs ladder_init0 baseline", "zero_token_area", "0"]
    assert late["n"] == "1" and late["ci_low"] == "" and late["excluded"].startswith("pending")
    assert ("ladder_late: late_mask vs ladder_init0 baseline", "dead_last", "0") not in paired  # an older run's fields

    summary = (out / "summary.md").read_text()
    assert "## ladder_init0: mask vs baseline\n\n3 seed pairs (seeds 0, 1, 2)." in summary
    assert "## ladder_init0: mask vs random_mask\n\n1 seed pair (seeds 0)." in summary
    assert "## ladder_slow: penalty_1e-4 vs baseline\n\n0 seed pairs: nothing to compare yet." in summary
    assert "ladder_default_init no sweep file" in summary and "control − arm" in summary

    for name in ("zero_token.png", "dead_experts.png", "partner_co_selection.png", "val_loss.png"):
        assert_drawn(out / name)
    zero = figures["zero_token.png"].axes  # rows: ladder_init0, ladder_late; columns: layers 0, 1
    assert [ax.get_title() for ax in zero] == ["ladder_init0, layer 0", "ladder_init0, layer 1",
                                               "ladder_late, layer 0", "ladder_late, layer 1"]
    mask_mean = [sum(9 - seed if step < 150 - 20 * seed else 2 for seed in (0, 1, 2)) / 3 for step in range(1, 201)]
    assert_curve(zero[1], "mask (3 seeds)", range(1, 201), mask_mean)
    assert_curve(zero[2], "late_mask (1 seed)", range(1, 201), [1] * 200)
    assert_curve(zero[2], "ladder_init0 baseline (3 seeds)", range(1, 201), [10 if s < 150 else 2 for s in range(1, 201)])
    assert_curve(figures["val_loss.png"].axes[0], "random_mask (1 seed)", [100, 200], [2.2, 2.2])

"""The when-does-GatePro-act report (docs/RESULTS.md) from the shipped sweep files, on synthetic
archived runs: the tables pair the right runs and count the steps the right way."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gatepro_dist.experiments.sweep import load_sweep
from gatepro_dist.experiments.when_report import SWEEPS, build, steps_to_threshold
from plots import assert_curve, assert_drawn, capture_figures, curves

ROOT = Path(__file__).resolve().parent.parent


def _records(zero_by_layer_at_step, steps=1000, val=2.0, changed=0):
    records = []
    for step in range(1, steps + 1):
        moe = [{"layer": i, "zero_token_experts": zero(step), "gatepro_topk_changed": changed,
                "routing_margin": {"tokens": 2048, "tied": 0.0, "below_penalty": 1.0 / step, "p10": 0.0,
                                   "p50": 0.1, "p90": 0.5}} for i, zero in enumerate(zero_by_layer_at_step)]
        records.append({"step": step, "loss": 3.0, "moe": moe, **({"val_loss": val} if step % 100 == 0 else {})})
    return records


def test_steps_to_threshold_first_and_for_good():
    records = _records([lambda s: max(0, 122 - s // 10), lambda s: 128,
                        lambda s: 10 if s < 20 or s > 600 else 120,  # an early dip, a collapse, then spread
                        lambda s: 10 if s < 990 else 100])  # below almost to the end, above at the end
    assert steps_to_threshold(records, 0, 128) == steps_to_threshold(records, 0, 128, for_good=True) == 970
    assert steps_to_threshold(records, 1, 128) is None and steps_to_threshold(records, 1, 128, for_good=True) is None
    assert steps_to_threshold(records, 2, 128) == 1 and steps_to_threshold(records, 2, 128, for_good=True) == 601
    assert steps_to_threshold(records, 3, 128) == 1 and steps_to_threshold(records, 3, 128, for_good=True) is None


def test_report_pairs_gatepro_with_the_baseline_of_the_same_seed(tmp_path, monkeypatch):
    configs = tmp_path / "configs" / "sweeps"
    configs.mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "quickstart.yaml", tmp_path / "configs")
    for name in SWEEPS:
        text = (ROOT / "configs" / "sweeps" / f"{name}.yaml").read_text()
        (configs / f"{name}.yaml").write_text(text.replace("../../docs/results/when/runs", str(tmp_path / "archive")))
    sweep = load_sweep(configs / "when_init0.yaml")
    for run in sweep.runs:  # GatePro reaches the threshold 100 steps sooner than the baseline
        gatepro, aux, seed = (run.axes[k] for k in ("router.gatepro.enabled", "router.aux_loss_coef", "train.seed"))
        lag = 0 if gatepro else 100
        records = _records([lambda s, d=lag + 10 * seed: 128 if s < 200 + d else 0] * 4,
                           val=2.0 if gatepro else 2.1, changed=5 if gatepro else 0)
        path = tmp_path / "archive" / "when_init0" / f"{run.name}.jsonl.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in records)
    for name in ("when_default_init", "when_default_init_seeds"):  # GatePro at 150, the baseline at 250; 7 idle at the end
        for run in load_sweep(configs / f"{name}.yaml").runs:
            gatepro = run.axes["router.gatepro.enabled"]
            records = _records([lambda s, d=150 if gatepro else 250: 128 if s < d else 7] * 4, changed=3 if gatepro else 0)
            path = tmp_path / "archive" / name / f"{run.name}.jsonl.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(path, "wt") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in records)
    figures = capture_figures(monkeypatch)
    counts = build(configs, tmp_path / "out")
    assert counts == {"when_init0": 12, "when_default_init": 4, "when_default_init_seeds": 4, "when_lambda": 0,
                      "when_hotswap": 0}
    with open(tmp_path / "out" / "paired.csv") as fh:
        paired = list(csv.DictReader(fh))
    assert [row["init"] for row in paired] == ["0"] * 6 + ["default"] * 4  # init 0: 2 balance losses x 3 seeds
    assert [int(row["layer0_baseline"]) - int(row["layer0_gatepro"]) for row in paired[6:]] == [100] * 4
    paired = paired[:6]
    for row in paired:
        assert int(row["layer0_baseline"]) - int(row["layer0_gatepro"]) == 100
        assert int(row["layer0_gatepro"]) == 200 + 10 * int(row["seed"])
    with open(tmp_path / "out" / "hotswap.csv") as fh:
        assert sorted({r["gatepro"] for r in csv.DictReader(fh)}) == ["always", "never"]  # no swap run yet
    with open(tmp_path / "out" / "lambda.csv") as fh:
        lam = list(csv.DictReader(fh))
    # when_init0's baseline (λ = 0, GatePro off) and GatePro run, seed 0, balance 0.01
    assert [float(r["penalty"]) for r in lam] == [0.0, 1e-4]
    assert float(lam[1]["gatepro_changed_fraction"]) == pytest.approx(5 / 2048, rel=1e-3)  # 4 digits in the CSV
    assert [int(r["layer0"]) for r in lam] == [300, 200]  # the baseline lags 100 steps
    for png in ("zero_token.png", "val_loss.png", "margin.png"):
        assert_drawn(tmp_path / "out" / png)
    _assert_plotted_curves(figures)
    summary = (tmp_path / "out" / "summary.md").read_text()
    # both tables of both inits: every seed 100 steps sooner (the default init: seeds 0, 1, 2 at balance 0.01)
    assert summary.count("| 0.01 | 3 | +100 (3/3 sooner) |") == 4
    assert summary.count("(router init default), GatePro / baseline") == 2
    default = summary[summary.index("The default router init"):].splitlines()[4:12]  # balance 0.01: seeds 0, 1, 2; then 0
    assert [row.split(" | ")[:3] for row in default] == [
        ["| on", "0.01", "0"], ["| off", "0.01", "0"], ["| on", "0.01", "1"], ["| off", "0.01", "1"],
        ["| on", "0.01", "2"], ["| off", "0.01", "2"], ["| on", "0.0", "0"], ["| off", "0.0", "0"]]
    assert [row.split(" | ")[4:7] for row in default[:2]] == [["0.001465", "150 / 150 / 150 / 150", "7"],
                                                                ["0", "250 / 250 / 250 / 250", "7"]]


def _assert_plotted_curves(figures):
    """The numbers behind the report's plots, from the synthetic runs above: every curve is the mean
    over its seeds of a step function, so its value at each step is known."""
    steps = np.arange(1, 1001)

    def mean_over_seeds(thresholds, after):  # 128 zero-token experts before each seed's threshold
        return np.mean([np.where(steps < t, 128.0, after) for t in thresholds], axis=0)

    expected = {  # label -> zero-token curve; init 0: seed s reaches 0 at 200 + 10 s (GatePro), 100 later (baseline)
        **{f"init 0, GatePro, balance {b} (3 seeds)": mean_over_seeds([200, 210, 220], 0.0) for b in ("0.0", "0.01")},
        **{f"init 0, baseline, balance {b} (3 seeds)": mean_over_seeds([300, 310, 320], 0.0) for b in ("0.0", "0.01")},
        # the default init: seeds 0, 1, 2 at balance 0.01, seed 0 at balance 0.0, all alike
        **{f"init default, GatePro, balance {b}": mean_over_seeds([150], 7.0) for b in ("0.0 (1 seed)", "0.01 (3 seeds)")},
        **{f"init default, baseline, balance {b}": mean_over_seeds([250], 7.0) for b in ("0.0 (1 seed)", "0.01 (3 seeds)")},
    }
    layers = figures["zero_token.png"].axes
    assert len(layers) == 4
    for ax in layers:
        assert sorted(curves(ax)) == sorted(expected)
        for label, values in expected.items():
            assert_curve(ax, label, steps, values)
    (ax,) = figures["val_loss.png"].axes  # init 0 only: GatePro 2.0, the baseline 2.1, every 100 steps
    for label, (x, y) in curves(ax).items():
        assert label.startswith("init 0, ")
        np.testing.assert_array_equal(x, np.arange(100, 1001, 100))
        np.testing.assert_allclose(y, 2.0 if "GatePro" in label else 2.1, rtol=1e-12)
    assert len(curves(ax)) == 4
    (ax,) = figures["margin.png"].axes  # below_penalty = 1 / step in every layer of both runs
    assert len(curves(ax)) == 2
    for label in curves(ax):
        assert_curve(ax, label, steps, 1.0 / steps)

"""gatepro-sweep end to end on a tiny grid: every run trains, one CSV row per run, plots written."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from gatepro_dist.config import ConfigError
from gatepro_dist.experiments.sweep import load_sweep, run_config
from gatepro_dist.experiments.sweep_report import BASE_COLUMNS, RESULT_COLUMNS, SEED_STATS, aggregate, summarize_run
from gatepro_dist.train.metrics import read_metrics
from plots import assert_curve, assert_drawn, band_range, capture_figures, curves
from test_trainer import TINY


def write_sweep(tmp_path, grid: str, extra: str = "") -> str:
    overrides = ", ".join([*TINY, "train.steps=3", "train.save_every=3", "train.eval_every=3"])
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: tiny\nout_dir: {tmp_path / 'out'}\nworld: 1\noverrides: [{overrides}]\n"
                    f"grid:\n{grid}\n{extra}")
    return str(path)


@pytest.mark.slow
def test_sweep_runs_every_config_writes_one_csv_row_per_run_and_finishes_from_its_archive(tmp_path, monkeypatch):
    # One 2-process run (torchrun) beside the 1-process grid: the world axis and the throughput plot
    # against world size need two sizes. It is also the hot-swap run (GatePro off after step 2), so
    # three launches cover both. Then the sweep in pieces across sessions: the archive (committed) is
    # all that survives a machine, and the summary is rebuilt from it alone.
    sweep = write_sweep(tmp_path, "  router.gatepro.enabled: [true, false]\n",
                        "runs:\n  - {name: swap_world2, world: 2, router.gatepro.schedule: [[0, true], [2, false]]}\n"
                        f"archive: {tmp_path / 'archive'}\n")
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "out" / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert list(rows[0]) == BASE_COLUMNS + ["router.gatepro.enabled", "router.gatepro.schedule"] + RESULT_COLUMNS
    assert {r["run"] for r in rows} == {"enabled=true", "enabled=false", "swap_world2"}
    assert sorted(int(r["world"]) for r in rows) == [1, 1, 2]
    assert all(int(r["steps"]) == 3 and float(r["final_val_loss"]) > 0 for r in rows)
    swap = next(r for r in rows if r["run"] == "swap_world2")
    assert int(swap["gatepro_on_steps"]) == 2
    for r in rows:  # TINY: stats_every=2, so steps 2 and 3 carry similarity; λ=1e-2 penalises
        assert -1 < float(r["final_mean_cos"]) < 1 and 0 < float(r["final_mean_angle_deg"]) < 180
        assert (int(r["gatepro_penalised"]) > 0) == (r["run"] != "enabled=false")
    assert not (tmp_path / "out" / "summary_over_seeds.csv").exists()  # no seed axis, no seed table
    for png in ("zero_token_experts.png", "val_loss.png", "throughput.png", "similarity.png"):
        assert_drawn(tmp_path / "out" / png)
    again = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep], capture_output=True, text=True)
    assert again.stdout.count("already complete") == 3

    # The plots again, in this process (the sweep drew them in its own): their numbers are the runs'.
    figures = capture_figures(monkeypatch)
    loaded = load_sweep(sweep)
    aggregate(loaded)
    records = {run.name: read_metrics(run.run_dir(loaded.out_dir) / "metrics.jsonl") for run in loaded.runs}
    layers = figures["zero_token_experts.png"].axes
    assert len(layers) == 2  # TINY: 2 MoE layers
    for name, recs in records.items():
        steps = [r["step"] for r in recs]
        assert steps == [1, 2, 3]
        for layer, ax in enumerate(layers):
            assert_curve(ax, name, steps, [r["moe"][layer]["zero_token_experts"] for r in recs])
        (ax,) = figures["val_loss.png"].axes
        assert_curve(ax, name, [3], [recs[-1]["val_loss"]])
        mean_cos, entropy = figures["similarity.png"].axes
        with_similarity = [r for r in recs if "similarity" in r["moe"][0]]
        assert [r["step"] for r in with_similarity] == [2, 3]  # stats_every=2 and the last step
        for ax, stat in ((mean_cos, "mean_cos"), (entropy, "spectral_entropy")):
            assert_curve(ax, name, [2, 3], [sum(m["similarity"][stat] for m in r["moe"]) / 2 for r in with_similarity])
    (ax,) = figures["throughput.png"].axes  # one point per run: (world size, its mean tokens/s)
    plotted = sorted((x, y) for xs, ys in curves(ax).values() for x, y in zip(xs, ys))
    expected = sorted((int(r["world"]), float(r["mean_tokens_per_s"])) for r in rows)
    assert [v for point in plotted for v in point] == pytest.approx([v for point in expected for v in point])

    archived = sorted(p.name for p in (tmp_path / "archive" / "tiny").iterdir())
    assert archived == ["enabled=false.jsonl.gz", "enabled=true.jsonl.gz", "swap_world2.jsonl.gz"]
    blob = (tmp_path / "archive" / "tiny" / "enabled=true.jsonl.gz").read_bytes()
    shutil.rmtree(tmp_path / "out")  # a fresh machine: only the archive is left
    fresh = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep], capture_output=True, text=True,
                           timeout=600)
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.count("already complete") == 3 and not (tmp_path / "out" / "enabled=true").exists()
    with open(tmp_path / "out" / "summary.csv") as f:
        assert list(csv.DictReader(f)) == rows  # every summary column comes from what the archive keeps
    assert (tmp_path / "archive" / "tiny" / "enabled=true.jsonl.gz").read_bytes() == blob  # left as it was


def test_bad_run_in_a_sweep_is_refused_before_anything_runs(tmp_path):
    sweep = write_sweep(tmp_path, "  moe.top_k: [2, 99]\n")
    with pytest.raises(ConfigError, match="moe.top_k"):
        load_sweep(sweep)
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep], capture_output=True, text=True)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()


def test_dry_run_prints_one_torchrun_command_per_multi_process_run(tmp_path):
    sweep = write_sweep(tmp_path, "  world: [1, 2]\n")
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep, "--dry-run"],
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 and "torch.distributed.run" not in lines[0] and "--nproc-per-node=2" in lines[1]


def test_only_runs_the_runs_whose_names_match(tmp_path):
    sweep = write_sweep(tmp_path, "  train.seed: [0, 1, 2]\n  router.gatepro.enabled: [true, false]\n")
    proc = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep, "--dry-run",
                           "--only", "seed=1*", "--only", "seed=2_enabled=false"], capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and len(lines) == 3
    assert all("train.seed=1" in line for line in lines[:2]) and "train.seed=2" in lines[2]
    none = subprocess.run([sys.executable, "-m", "gatepro_dist.cli.sweep", sweep, "--only", "mask*"],
                          capture_output=True, text=True)
    assert none.returncode == 2 and "no run of tiny matches --only mask*" in none.stderr


def fake_records(steps: int, zero_token: list[int], val_loss: float, mean_cos: float, changed: int) -> list[dict]:
    """Metrics records of a 2-layer run: similarity on even steps, validation on the last."""
    records = []
    for step in range(1, steps + 1):
        moe = [{"layer": i, "zero_token_experts": zero_token[step - 1], "gatepro_penalised": 2 * changed,
                "gatepro_topk_changed": changed} for i in range(2)]
        if step % 2 == 0:
            for i, layer in enumerate(moe):
                layer["similarity"] = {"mean_cos": mean_cos + 0.1 * i, "mean_angle_deg": 80.0, "spectral_entropy": 3.0}
        records.append({"step": step, "loss": 3.0 + step, "tokens_per_s": 1000.0, "gatepro": changed > 0, "moe": moe,
                        **({"val_loss": val_loss} if step == steps else {})})
    return records


def test_summarize_run_counts_zero_token_experts_and_gatepro_changes_over_the_whole_run():
    row = summarize_run(fake_records(4, [3, 0, 1, 0], 2.5, 0.2, changed=5))
    assert row["mean_zero_token_experts"] == 1.0  # (3 + 0 + 1 + 0) / 4 per layer
    assert row["mean_loss_last10pct"] == 7.0  # the last 10% of 4 records is the last one
    assert row["all_experts_used_from_step"] == 4 and row["first_step_all_experts_used"] == 2
    assert row["final_mean_cos"] == pytest.approx(0.25)  # layers 0.2 and 0.3
    assert row["gatepro_topk_changed"] == 5 * 4 * 2 and row["gatepro_penalised"] == 10 * 4 * 2
    assert summarize_run(fake_records(2, [0, 1], 2.5, 0.2, changed=0))["all_experts_used_from_step"] == ""


def test_runs_that_differ_only_in_seed_are_summarised_as_mean_and_std(tmp_path, monkeypatch):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: seeds\nout_dir: {tmp_path / 'out'}\nworld: 1\noverrides: [{', '.join(TINY)}, train.steps=4]\n"
                    "grid:\n  router.gatepro.enabled: [true, false]\n  train.seed: [0, 1, 2]\n")
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs][:3] == ["enabled=true_seed=0", "enabled=true_seed=1", "enabled=true_seed=2"]
    val_losses = {True: [2.0, 2.2, 2.4], False: [3.0, 3.0, 3.0]}
    for run in sweep.runs:
        on, seed = run.axes["router.gatepro.enabled"], run.axes["train.seed"]
        records = fake_records(4, [seed, 0, 0, seed], val_losses[on][seed], 0.1 * seed, changed=int(on))
        run.run_dir(sweep.out_dir).mkdir(parents=True)
        (run.run_dir(sweep.out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = capture_figures(monkeypatch)
    aggregate(sweep)
    with open(sweep.out_dir / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 6  # still one row per run
    with open(sweep.out_dir / "summary_over_seeds.csv") as f:
        groups = list(csv.DictReader(f))
    assert list(groups[0])[:3] == ["group", "router.gatepro.enabled", "seeds"]
    assert list(groups[0])[3:] == [f"{s}_{m}" for s in SEED_STATS for m in ("mean", "std")]
    gatepro, baseline = groups
    assert gatepro["seeds"] == "3" and gatepro["router.gatepro.enabled"] == "True"
    assert float(gatepro["final_val_loss_mean"]) == pytest.approx(2.2)
    assert float(gatepro["final_val_loss_std"]) == pytest.approx(0.2)  # sample std of 2.0, 2.2, 2.4
    assert float(baseline["final_val_loss_std"]) == 0.0
    assert float(gatepro["final_zero_token_experts_mean"]) == pytest.approx(2.0)  # seeds 0,1,2 on 2 layers
    assert float(gatepro["final_mean_cos_mean"]) == pytest.approx(0.15)
    assert float(baseline["gatepro_topk_changed_mean"]) == 0.0
    assert "| enabled=True | 3 | 2.200 ± 0.200 |" in (sweep.out_dir / "summary_over_seeds.md").read_text()
    for png in ("zero_token_experts.png", "val_loss.png", "similarity.png"):
        assert_drawn(sweep.out_dir / png)
    # One curve per group: the mean over its 3 seeds, and a band from the lowest seed to the highest.
    for ax in figures["zero_token_experts.png"].axes:  # seed s has [s, 0, 0, s] zero-token experts
        for group in ("enabled=True (3 seeds)", "enabled=False (3 seeds)"):
            assert_curve(ax, group, [1, 2, 3, 4], [1.0, 0.0, 0.0, 1.0])
        assert band_range(ax, 0) == band_range(ax, 1) == (0.0, 2.0)
    (ax,) = figures["val_loss.png"].axes
    assert_curve(ax, "enabled=True (3 seeds)", [4], [2.2])
    assert_curve(ax, "enabled=False (3 seeds)", [4], [3.0])
    mean_cos, entropy = figures["similarity.png"].axes  # seed s: layers 0.1 s and 0.1 s + 0.1
    assert_curve(mean_cos, "enabled=True (3 seeds)", [2, 4], [0.15, 0.15])
    assert band_range(mean_cos, 0) == pytest.approx((0.05, 0.25))
    assert_curve(entropy, "enabled=False (3 seeds)", [2, 4], [3.0, 3.0])


def test_archive_keeps_everything_but_the_per_expert_counts():
    from gatepro_dist.experiments.sweep import compact_record

    layer = {"layer": 0, "zero_token_experts": 3, "tokens_per_expert": [0, 5, 9], "gatepro_topk_changed": 2,
             "routing_margin": {"tokens": 14, "tied": 0.0, "below_penalty": 0.5, "p10": 0.0, "p50": 1e-4,
                                "p90": 0.3, "below": {"1e-4": 0.5}}}
    record = {"step": 7, "loss": 2.5, "moe": [layer]}
    compact = compact_record(record)
    assert compact["step"] == 7 and compact["loss"] == 2.5
    assert compact["moe"][0] == {"layer": 0, "zero_token_experts": 3, "gatepro_topk_changed": 2,
                                 "routing_margin": {"tokens": 14, "tied": 0.0, "below_penalty": 0.5, "p10": 0.0,
                                                    "p50": 1e-4, "p90": 0.3}}
    assert record["moe"][0]["tokens_per_expert"] == [0, 5, 9]  # the input is not changed


def test_a_list_valued_axis_is_summarised_over_seeds(tmp_path):
    """The hot-swap grid (a GatePro schedule per run) with seeds: one group per schedule."""
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: swap\nout_dir: {tmp_path / 'out'}\nworld: 1\noverrides: [{', '.join(TINY)}, train.steps=4]\n"
                    "grid:\n  router.gatepro.schedule: [[[0, true], [2, false]], [[0, true], [3, false]]]\n"
                    "  train.seed: [0, 1]\n")
    sweep = load_sweep(path)
    for run in sweep.runs:
        seed = run.axes["train.seed"]
        records = fake_records(4, [seed, 0, 0, seed], 2.0 + seed, 0.1 * seed, changed=1)
        run.run_dir(sweep.out_dir).mkdir(parents=True)
        (run.run_dir(sweep.out_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    aggregate(sweep)
    with open(sweep.out_dir / "summary_over_seeds.csv") as f:
        groups = list(csv.DictReader(f))
    assert [g["router.gatepro.schedule"] for g in groups] == ["[[0, true], [2, false]]", "[[0, true], [3, false]]"]
    assert [g["seeds"] for g in groups] == ["2", "2"]
    assert [float(g["final_val_loss_mean"]) for g in groups] == [pytest.approx(2.5)] * 2


def test_arms_are_crossed_with_the_grid_seed_by_seed(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(f"name: arms\nout_dir: {tmp_path / 'out'}\nworld: 1\noverrides: [{', '.join(TINY)}]\n"
                    "grid:\n  train.seed: [0, 1]\n"
                    "arms:\n  - {name: baseline, router.gatepro.enabled: false}\n"
                    "  - {name: mask, router.gatepro.mode: mask, router.gatepro.pairing: random}\n")
    sweep = load_sweep(path)
    assert [r.name for r in sweep.runs] == ["baseline_seed=0", "mask_seed=0", "baseline_seed=1", "mask_seed=1"]
    mask_1 = run_config(sweep, sweep.runs[3])
    assert (mask_1.router.gatepro.mode, mask_1.router.gatepro.pairing, mask_1.train.seed) == ("mask", "random", 1)
    assert run_config(sweep, sweep.runs[0]).router.gatepro.enabled is False
    path.write_text(path.read_text() + "  - {router.gatepro.mode: mask}\n")
    with pytest.raises(ConfigError, match="every entry of arms needs a name"):
        load_sweep(path)

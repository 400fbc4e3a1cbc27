"""metrics.jsonl writing/resuming, the progress line, and the Markdown + PNG run report."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gatepro_dist.train.metrics import MetricsWriter, ProgressBar, flatten_scalars, read_metrics
from plots import assert_curve, assert_drawn, capture_figures
from gatepro_dist.train.report import (
    EXPERT_LOAD_PNG,
    LOSS_PNG,
    SIMILARITY_PNG,
    ZERO_TOKEN_PNG,
    main,
    write_report,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_EXPERTS = 8
TOKENS_PER_STEP = 64  # routed assignments per layer per step (tokens x top-k)


def synthetic_records(num_steps=40, num_layers=2, gatepro_on_until=None, val_every=10,
                      similarity_every=5):
    """A run whose zero-token count falls over time, deeper layers slower (as in the paper)."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, num_steps + 1):
        moe = []
        for layer in range(num_layers):
            zero = max(0, NUM_EXPERTS - 1 - (step * (num_layers - layer)) // 8)
            counts = np.zeros(NUM_EXPERTS, dtype=int)
            used = NUM_EXPERTS - zero
            counts[:used] = rng.multinomial(TOKENS_PER_STEP, np.ones(used) / used)
            zero = int((counts == 0).sum())  # multinomial may leave more experts empty
            stats = {
                "layer": layer, "zero_token_experts": zero, "max_load": int(counts.max()),
                "mean_load": TOKENS_PER_STEP / NUM_EXPERTS, "aux_loss": 1.0 + 0.01 * zero,
                "z_loss": 2.3, "dropped_tokens": 0, "gatepro_penalised": 40,
                "gatepro_topk_changed": 2, "tokens_per_expert": counts.tolist(),
            }
            if similarity_every and step % similarity_every == 0:
                stats["similarity"] = {"mean_cos": 0.5 - 0.01 * step + 0.05 * layer,
                                       "mean_angle_deg": 60.0 + step, "spectral_entropy": 1.9}
            moe.append(stats)
        record = {
            "step": step, "loss": 5.0 - 0.05 * step, "lr": 1e-3, "grad_norm": 0.8,
            "tokens_per_s": 4000.0 + 37.0 * step,
            "gatepro": gatepro_on_until is None or step < gatepro_on_until,
            "moe": moe,
        }
        if val_every and step % val_every == 0:
            record["val_loss"] = 5.1 - 0.05 * step + (0.6 if step == 40 else 0.0)  # overfits at the end
        records.append(record)
    return records


def write_jsonl(run_dir: Path, records) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    with MetricsWriter(run_dir, enabled=True, tensorboard=False) as writer:
        for record in records:
            writer.write(record)
    return run_dir / "metrics.jsonl"


def assert_valid_png(path: Path):
    assert_drawn(path)
    assert path.stat().st_size > 1000, f"{path} is too small to hold a plot"


# ----------------------------------------------------------------------------------- MetricsWriter


def test_writer_appends_one_json_object_per_line(tmp_path):
    records = synthetic_records(num_steps=5)
    path = write_jsonl(tmp_path, records)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_reopened_writer_continues_the_same_file(tmp_path):
    records = synthetic_records(num_steps=6)
    write_jsonl(tmp_path, records[:3])
    write_jsonl(tmp_path, records[3:])
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_non_zero_rank_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    writer = MetricsWriter(run_dir, enabled=False)
    writer.write({"step": 1, "loss": 1.0})
    assert writer.truncate_after(1) == 0
    writer.close()
    assert not run_dir.exists()


def test_truncate_after_keeps_only_earlier_steps(tmp_path):
    # A run killed after logging steps 1..10 but checkpointed at step 7 resumes at step 7.
    write_jsonl(tmp_path, synthetic_records(num_steps=10))
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    assert writer.truncate_after(7) == 4
    writer.write({"step": 7, "loss": 0.5})
    writer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    assert records[-1]["loss"] == 0.5
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_line_cut_by_a_crash_is_dropped_and_later_records_stay_readable(tmp_path):
    path = write_jsonl(tmp_path, synthetic_records(num_steps=3))
    with path.open("a") as f:
        f.write('{"step": 4, "loss": 1.')  # killed mid-write: no closing brace, no newline
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.write({"step": 4, "loss": 1.5})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.truncate_after(10)
    assert len(path.read_text().splitlines()) == 4  # the broken line is gone for good


def test_missing_tensorboard_is_one_info_line_not_an_error(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with caplog.at_level(logging.INFO, logger="gatepro_dist.train.metrics"):
        with MetricsWriter(tmp_path, enabled=True, tensorboard=True) as writer:
            writer.write({"step": 1, "loss": 2.0})
    assert any("tensorboard is not installed" in m for m in caplog.messages)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.0}]


def test_tensorboard_gets_flattened_scalars_and_is_purged_on_resume(tmp_path):
    """The real SummaryWriter (tests/run.sh installs tensorboard), read back from its event files:
    a resume from step 3 drops the killed run's events from step 3 on, and its new ones replace them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = synthetic_records(num_steps=4)
    again = [dict(r, loss=r["loss"] + 100.0) for r in first[2:]]  # the resumed run's steps 3 and 4
    with MetricsWriter(tmp_path, enabled=True, tensorboard=True) as writer:
        for record in first:
            writer.write(record)
        writer.truncate_after(3)
        for record in again:
            writer.write(record)

    events = EventAccumulator(str(tmp_path / "tensorboard"), purge_orphaned_data=True)
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    expected = [(r["step"], r["loss"]) for r in [*first[:2], *again]]
    assert [step for step, _ in loss] == [1, 2, 3, 4]
    assert [value for _, value in loss] == pytest.approx([value for _, value in expected], rel=1e-6)
    zero = [(e.step, e.value) for e in events.Scalars("moe/1/zero_token_experts")]
    assert zero == [(r["step"], r["moe"][1]["zero_token_experts"]) for r in first]
    assert read_metrics(tmp_path / "metrics.jsonl") == [*first[:2], *again]


def test_flatten_scalars_names_per_layer_fields():
    record = synthetic_records(num_steps=10, num_layers=2)[9]
    scalars = flatten_scalars(record)
    assert scalars["loss"] == pytest.approx(4.5)
    assert scalars["val_loss"] == pytest.approx(4.6)
    assert scalars["gatepro"] == 1.0
    assert scalars["moe/1/zero_token_experts"] == record["moe"][1]["zero_token_experts"]
    assert scalars["moe/0/similarity/mean_cos"] == pytest.approx(0.4)
    assert not any("tokens_per_expert" in tag for tag in scalars)  # lists are not scalars


def test_missing_metrics_file_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_empty_metrics_file_raises_value_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=str(tmp_path / "metrics.jsonl")):
        write_report(tmp_path)


# ------------------------------------------------------------------------------------- ProgressBar


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_bar_prints_a_plain_line_every_tenth_when_not_a_tty():
    stream, clock = io.StringIO(), FakeClock()
    bar = ProgressBar(total_steps=100, enabled=True, stream=stream, clock=clock)
    for step in range(1, 101):
        clock.now = float(step)  # one second per step
        bar.update(step, loss=3.0, tokens_per_s=1234.0)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[1] for line in lines] == [f"{s}/100" for s in (1, 10, 20, 30, 40, 50,
                                                                        60, 70, 80, 90, 100)]
    assert "loss 3.0000" in lines[1] and "1,234 tok/s" in lines[1]
    assert lines[5].endswith("ETA 0:00:50")  # 50 steps left at one second each
    assert lines[-1].endswith("ETA 0:00:00")


def test_progress_bar_redraws_in_place_on_a_tty():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    stream, clock = TTY(), FakeClock()
    bar = ProgressBar(total_steps=3, enabled=True, stream=stream, clock=clock)
    for step in (1, 2, 3):
        clock.now = float(step)
        bar.update(step, loss=1.0)
    bar.close()
    assert stream.getvalue().count("\r") == 3 and stream.getvalue().endswith("\n")


def test_disabled_progress_bar_is_silent():
    stream = io.StringIO()
    bar = ProgressBar(total_steps=10, enabled=False, stream=stream)
    bar.update(5, loss=1.0)
    bar.close()
    assert stream.getvalue() == ""


# ------------------------------------------------------------------------------------------ report


def test_report_writes_valid_pngs_and_links_each_one(tmp_path, monkeypatch):
    records = synthetic_records()
    write_jsonl(tmp_path, records)
    (tmp_path / "config.yaml").write_text("model:\n  num_experts: 8\n")
    figures = capture_figures(monkeypatch)
    report = write_report(tmp_path)
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for png in (LOSS_PNG, ZERO_TOKEN_PNG, EXPERT_LOAD_PNG, SIMILARITY_PNG):
        assert_valid_png(tmp_path / png)
        assert f"]({png})" in text  # relative link, so the run dir can be moved or zipped
    assert "num_experts: 8" in text  # the config is shown

    # The numbers behind each plot are the records'.
    steps = [r["step"] for r in records]
    (ax,) = figures[LOSS_PNG].axes
    assert_curve(ax, "training loss", steps, [r["loss"] for r in records])
    assert_curve(ax, "validation loss", [10, 20, 30, 40], [r["val_loss"] for r in records if "val_loss" in r])
    (ax,) = figures[ZERO_TOKEN_PNG].axes
    (ax_sim,) = figures[SIMILARITY_PNG].axes
    for layer in (0, 1):
        assert_curve(ax, f"layer {layer}", steps, [r["moe"][layer]["zero_token_experts"] for r in records])
        assert_curve(ax_sim, f"layer {layer}", steps[4::5],
                     [r["moe"][layer]["similarity"]["mean_cos"] for r in records[4::5]])
    heatmap, _colorbar = figures[EXPERT_LOAD_PNG].axes
    # 40 records: the last 4 (10%), each step's counts over its 64 assignments, averaged.
    expected_LE = np.array([np.mean([np.array(r["moe"][layer]["tokens_per_expert"]) / TOKENS_PER_STEP
                                     for r in records[-4:]], axis=0) for layer in (0, 1)])
    np.testing.assert_allclose(np.asarray(heatmap.get_images()[0].get_array()), expected_LE, rtol=1e-12)


def test_report_summary_holds_the_run_numbers(tmp_path):
    records = synthetic_records(num_steps=40, gatepro_on_until=21)
    write_jsonl(tmp_path, records)
    text = write_report(tmp_path).read_text()

    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    best_step, best_val = min(val, key=lambda sv: sv[1])
    mean_tokens_per_s = np.mean([r["tokens_per_s"] for r in records])
    final_zero = {m["layer"]: m["zero_token_experts"] for m in records[-1]["moe"]}

    assert "| steps | 1–40 (40 logged records) |" in text
    assert f"| final loss | {records[-1]['loss']:.4f} (step 40) |" in text
    assert f"| final val loss | {val[-1][1]:.4f} (step 40) |" in text
    assert best_step == 30  # not the last eval: best and final differ
    assert f"| best val loss | {best_val:.4f} (step {best_step}) |" in text
    assert f"| mean tokens/s | {mean_tokens_per_s:,.0f} |" in text
    assert (f"| final zero-token experts | layer 0: {final_zero[0]}/8, "
            f"layer 1: {final_zero[1]}/8 |") in text
    assert "| GatePro | off at the last step; switched on→off at step 21 |" in text
    # 40 records with counts: the heatmap averages the last 4 and says so.
    assert "averaged over the last 4 logged steps (steps 37–40" in text


def test_report_handles_gatepro_off_one_layer_and_no_val_loss(tmp_path):
    records = synthetic_records(num_steps=12, num_layers=1, val_every=0, similarity_every=0)
    for record in records:
        record["gatepro"] = False
    write_jsonl(tmp_path, records)
    text = write_report(tmp_path).read_text()
    for png in (LOSS_PNG, ZERO_TOKEN_PNG, EXPERT_LOAD_PNG):
        assert_valid_png(tmp_path / png)
    assert SIMILARITY_PNG not in text and not (tmp_path / SIMILARITY_PNG).exists()
    assert "| best val loss | — |" in text
    assert "| GatePro | off at the last step |" in text
    assert "averaged over the last 2 logged steps (steps 11–12" in text


def test_report_of_a_single_record_uses_the_last_step_for_the_heatmap(tmp_path):
    write_jsonl(tmp_path, synthetic_records(num_steps=1))
    text = write_report(tmp_path).read_text()
    assert "from the last logged step (step 1)" in text


def test_report_cli_regenerates_the_report(tmp_path):
    write_jsonl(tmp_path, synthetic_records(num_steps=8))
    done = subprocess.run([sys.executable, "-m", "gatepro_dist.train.report", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "report.md")
    assert_valid_png(tmp_path / LOSS_PNG)


def test_report_cli_names_the_missing_file(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert str(tmp_path / "metrics.jsonl") in capsys.readouterr().err

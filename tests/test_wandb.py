"""metrics.wandb: a real training run leaves a W&B run whose scalars are metrics.jsonl's.

The offline run is read back from its ``run-<id>.wandb`` file (W&B's transaction log of
``wandb.proto`` records) with ``read_transaction_log``, which checks every record's CRC.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

from test_trainer import run_training, tiny_config
from gatepro_dist.config import ConfigError
from gatepro_dist.config_checks import validate
from gatepro_dist.train.metrics import METRICS_FILE, MetricsWriter, flatten_scalars, read_metrics
from gatepro_dist.train.wandb_run import RUN_ID_FILE, WANDB_DIR, read_transaction_log as read_wandb_log


def history_by_step(records) -> dict[int, dict[str, float]]:
    """The logged scalars of each step (W&B's own ``_step``, ``_runtime``, ``_timestamp`` left out)."""
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            out[record.history.step.num] = {k: float(v) for k, v in items.items() if not k.startswith("_")}
    return out


def run_config(records) -> dict:
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / WANDB_DIR).glob("offline-run-*/run-*.wandb"))


def assert_same_scalars(logged: dict[int, dict[str, float]], records: list[dict]) -> None:
    assert sorted(logged) == [r["step"] for r in records]
    for record in records:
        expected, got = flatten_scalars(record), logged[record["step"]]
        assert got.keys() == expected.keys(), f"step {record['step']}: {sorted(got.keys() ^ expected.keys())}"
        for tag, value in expected.items():
            same = got[tag] == value or (math.isnan(got[tag]) and math.isnan(value))
            assert same, f"step {record['step']} {tag}: W&B has {got[tag]!r}, metrics.jsonl {value!r}"


def test_offline_run_holds_metrics_jsonl_scalars_and_a_resume_continues_its_id(tmp_path):
    """4 steps, then a resume to 6: two offline runs with one id, step for step metrics.jsonl's scalars
    (moe/<layer>/similarity/* included, on the stats steps), the resolved config as the run's config,
    and no W&B variable left in the caller's environment (its WANDB_SERVICE and our WANDB_MODE are put back)."""
    run_dir = tmp_path / "run"
    common = ["metrics.wandb=offline", "metrics.wandb_project=gatepro-test", "train.save_every=2",
              "train.resume=auto", "train.lr_schedule=constant"]  # constant: a resume may extend it
    environment = wandb_environment()
    run_training(1, run_dir, "train.steps=4", *common)
    assert wandb_environment() == environment
    run_training(1, run_dir, "train.steps=6", *common)
    assert wandb_environment() == environment

    records = read_metrics(run_dir / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert any("similarity" in layer for r in records for layer in r["moe"])
    run_id = (run_dir / WANDB_DIR / RUN_ID_FILE).read_text().strip()
    first, second = offline_runs(run_dir)
    assert first.name == second.name == f"run-{run_id}.wandb"
    first_records, second_records = read_wandb_log(first), read_wandb_log(second)
    assert_same_scalars(history_by_step(first_records), records[:4])
    assert_same_scalars(history_by_step(second_records), records[4:])
    cfg = tiny_config(run_dir, "train.steps=6", *common)
    assert run_config(second_records) == json.loads(json.dumps(cfg.to_dict()))
    assert first_records[-1].WhichOneof("record_type") == "exit"  # finished when the writer closed


def wandb_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith("WANDB")}


def test_a_fresh_run_in_the_same_directory_gets_a_new_wandb_id(tmp_path):
    """The id is reused exactly when metrics.jsonl is continued: with nothing kept, a new one. The
    writer leaves the process environment as it found it, every variable."""
    environment = dict(os.environ)
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb="offline", config={"a": 1})
    writer.truncate_after(1)
    writer.write({"step": 1, "loss": 2.5})
    writer.close()
    first_id = (tmp_path / WANDB_DIR / RUN_ID_FILE).read_text().strip()
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb="offline", config={"a": 1})
    writer.truncate_after(1)  # a fresh start: record 1 is dropped
    writer.close()
    assert dict(os.environ) == environment
    second_id = (tmp_path / WANDB_DIR / RUN_ID_FILE).read_text().strip()
    assert second_id != first_id
    assert sorted(path.name for path in offline_runs(tmp_path)) == sorted([f"run-{first_id}.wandb",
                                                                          f"run-{second_id}.wandb"])
    for path in offline_runs(tmp_path):  # both complete when their writer closed
        assert read_wandb_log(path)[-1].WhichOneof("record_type") == "exit"


def test_the_log_reader_refuses_a_damaged_record(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb="offline", config={})
    writer.write({"step": 1, "loss": 2.5})
    writer.close()
    (path,) = offline_runs(tmp_path)
    data = bytearray(path.read_bytes())
    data[20] ^= 0xFF  # inside the first record's data
    damaged = tmp_path / "damaged.wandb"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        read_wandb_log(damaged)
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        read_wandb_log(tmp_path / METRICS_FILE)


def test_missing_wandb_fails_validation_with_the_install_line(tmp_path, monkeypatch):
    """Refused by config validation (before any process group), and by the writer itself."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks an import as failing
    line = "metrics.wandb='offline' needs the wandb package, which is not installed; " \
           "pip install 'gatepro_dist[wandb]' or set metrics.wandb=null"
    with pytest.raises(ConfigError) as refused:
        tiny_config(tmp_path, "metrics.wandb=offline")
    assert str(refused.value) == line
    with pytest.raises(ImportError) as refused:
        MetricsWriter(tmp_path / "run", enabled=True, wandb="offline")
    assert str(refused.value) == line
    assert not (tmp_path / "run").exists()
    validate(tiny_config(tmp_path), 1)  # metrics.wandb=null needs nothing


def test_other_ranks_open_no_wandb_run(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False, wandb="offline", config={})
    writer.truncate_after(1)
    writer.write({"step": 1, "loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()

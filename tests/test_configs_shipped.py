"""Every config the repository ships loads and validates: configs/*.yaml through load_config +
validate (at the world size their parallel.ep needs), configs/sweeps/*.yaml through load_sweep,
which expands the grid and validates every run at its own world size. New files are picked up
by the glob; the lists below make sure the glob is not silently empty."""
from __future__ import annotations

from pathlib import Path

import pytest

from gatepro_dist.config import load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.experiments.sweep import load_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))
SWEEP_FILES = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def test_the_shipped_configs_are_found():
    assert {"quickstart.yaml", "baseline.yaml"} <= {p.name for p in CONFIG_FILES}
    assert {"gatepro_vs_baseline.yaml", "penalty.yaml", "scaling.yaml"} <= {p.name for p in SWEEP_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_shipped_config_loads_and_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative run_dir / data paths resolve here; validate creates nothing
    cfg = load_config(str(path))
    assert validate(cfg, cfg.parallel.ep) is cfg
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_shipped_sweep_loads_and_every_run_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep(path)  # raises ConfigError naming the first run that does not validate
    assert sweep.base is None or sweep.base.is_file()
    assert sweep.runs and len({run.name for run in sweep.runs}) == len(sweep.runs)
    assert list(tmp_path.iterdir()) == []

"""Grids of training runs: expand, validate, run (locally or as a Slurm array), aggregate.

A sweep file is YAML:

    name: gatepro_vs_baseline
    base: configs/quickstart.yaml        # relative to the sweep file
    out_dir: runs/sweeps/gatepro_vs_baseline
    world: 2                             # processes per run (an axis may override it)
    overrides: [train.steps=200]         # applied to every run
    grid:                                # cartesian product of these axes
      router.gatepro.enabled: [true, false]
      router.aux_loss_coef: [0.0, 0.01]
    runs:                                # optional: extra runs listed one by one
      - {name: hot_swap, router.gatepro.schedule: [[0, true], [100, false]]}

``arms:`` (optional) is a list of named settings crossed with the grid: every grid point runs every
arm, named ``<arm>_<grid point>`` (``mask_seed=0``), grid points outermost, so seed 0 of every arm
finishes before seed 1 starts:

    grid: {train.seed: [0, 1, 2]}
    arms:
      - {name: baseline, router.gatepro.enabled: false}
      - {name: mask, router.gatepro.mode: mask}

``archive: DIR`` (optional, relative to the sweep file) keeps a compact copy of each finished run's
metrics (``DIR/<sweep name>/<run>.jsonl.gz``: every record without the per-expert token counts, which are the
bulk) that can be committed: a run archived there counts as finished and is aggregated from it
even on a machine that never held its run directory, so a long sweep can be run in pieces across
sessions or machines.

Axis keys are config keys, plus ``world`` (processes). ``train.seed: [0, 1, 2]`` as an axis
repeats every other combination with several seeds (initialisation and data order); the report
then summarises each combination as mean ± std over its seeds. Every run's config is validated before
the first run starts. Each run writes to ``out_dir/<run name>``; a run whose metrics already
reach its last step is not run again, so an interrupted sweep continues where it stopped.
"""
from __future__ import annotations

import gzip
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, load_config
from ..config_checks import validate
from ..train.metrics import METRICS_FILE, read_metrics


@dataclass(frozen=True)
class Run:
    name: str
    world: int
    overrides: tuple[str, ...]  # dotted key=value, after the sweep's common overrides
    axes: dict = field(default_factory=dict, hash=False)  # the axis values that define this run

    def run_dir(self, out_dir: Path) -> Path:
        return out_dir / self.name


@dataclass(frozen=True)
class Sweep:
    name: str
    base: Path | None
    out_dir: Path
    runs: tuple[Run, ...]
    archive: Path | None = None


def _value_text(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _slug(axes: dict) -> str:
    parts = []
    for key, value in axes.items():
        short = key.split(".")[-1]
        parts.append(f"{short}={_value_text(value)}")
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", ",".join(parts)) or "run"


def _make_run(axes: dict, default_world: int, name: str | None = None) -> Run:
    axes = dict(axes)
    world_is_an_axis = "world" in axes
    world = int(axes.pop("world", default_world))
    overrides = tuple(f"{k}={_value_text(v)}" for k, v in axes.items())
    shown = {**({"world": world} if world_is_an_axis else {}), **axes}
    return Run(name or _slug(shown), world, overrides, {"world": world, **axes})


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep file; every run's config is validated (ConfigError on the first bad one)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist; pass the path of a sweep YAML")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"sweep file {path} is not valid YAML ({err}); fix its syntax") from None
    known = {"name", "base", "out_dir", "world", "overrides", "grid", "arms", "runs", "archive"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"sweep file {path} has unknown key(s) {unknown}; use only {sorted(known)}")
    base = (path.parent / spec["base"]).resolve() if spec.get("base") else None
    world = int(spec.get("world", 1))
    common = tuple(spec.get("overrides", []))
    grid = spec.get("grid", {}) or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep grid axis {key} must be a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())] if grid else []
    arms = [_arm(path, arm) for arm in spec.get("arms", []) or []]
    if arms:
        runs = [_make_run({**settings, **point}, world, name=f"{arm_name}_{_slug(point)}" if point else arm_name)
                for point in points or [{}] for arm_name, settings in arms]
    else:
        runs = [_make_run(point, world) for point in points]
    for extra in spec.get("runs", []) or []:
        extra = dict(extra)
        runs.append(_make_run(extra, world, name=extra.pop("name", None)))
    if not runs:
        raise ConfigError(f"sweep file {path} defines no runs; add a grid or a runs list")
    names = [r.name for r in runs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"sweep runs have the same name {duplicates}; give the explicit runs distinct names")
    out_dir = Path(spec.get("out_dir", f"runs/sweeps/{spec.get('name', path.stem)}"))
    archive = (path.parent / spec["archive"]).resolve() if spec.get("archive") else None
    sweep = Sweep(spec.get("name", path.stem), base, out_dir,
                  tuple(Run(r.name, r.world, common + r.overrides, r.axes) for r in runs), archive)
    for run in sweep.runs:
        try:
            validate(run_config(sweep, run), run.world)
        except ConfigError as err:
            raise ConfigError(f"sweep run '{run.name}': {err}") from None
    return sweep


def _arm(path: Path, arm) -> tuple[str, dict]:
    if not isinstance(arm, dict) or not isinstance(arm.get("name"), str):
        raise ConfigError(f"sweep file {path}: every entry of arms needs a name, got {arm!r}; "
                          "write arms as a list of {name: ..., key: value, ...}")
    settings = dict(arm)
    return settings.pop("name"), settings


def run_config(sweep: Sweep, run: Run):
    return load_config(str(sweep.base) if sweep.base else None,
                       [*run.overrides, f"train.run_dir={run.run_dir(sweep.out_dir)}"])


def train_command(sweep: Sweep, run: Run, python: str = "python3") -> list[str]:
    args = [str(sweep.base)] if sweep.base else []
    args += [*run.overrides, f"train.run_dir={run.run_dir(sweep.out_dir)}", "train.resume=auto"]
    if run.world == 1:
        return [python, "-m", "gatepro_dist.cli.train", *args]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={run.world}",
            "-m", "gatepro_dist.cli.train", *args]


def is_complete(sweep: Sweep, run: Run) -> bool:
    records = run_records(sweep, run)
    return bool(records) and records[-1].get("step", 0) >= run_config(sweep, run).train.steps


# Per MoE layer, the archive keeps everything but the per-expert counts, and of the routing margin
# its summary numbers (not the per-decade fractions).
_ARCHIVE_DROPPED_LAYER_KEYS = {"tokens_per_expert"}
_ARCHIVE_MARGIN_KEYS = ("tokens", "tied", "below_penalty", "p10", "p50", "p90")


def compact_record(record: dict) -> dict:
    out = dict(record)
    if "moe" in record:
        layers = []
        for layer in record["moe"]:
            kept = {k: v for k, v in layer.items() if k not in _ARCHIVE_DROPPED_LAYER_KEYS}
            if layer.get("routing_margin"):
                kept["routing_margin"] = {k: layer["routing_margin"][k] for k in _ARCHIVE_MARGIN_KEYS}
            layers.append(kept)
        out["moe"] = layers
    return out


def archive_path(sweep: Sweep, run: Run) -> Path | None:
    return None if sweep.archive is None else sweep.archive / sweep.name / f"{run.name}.jsonl.gz"


def archive_run(sweep: Sweep, run: Run) -> Path | None:
    """Write a finished run's compact records to the sweep's archive; return the path, or None
    when there is no archive or the run directory here does not hold the finished run."""
    path = archive_path(sweep, run)
    metrics = run.run_dir(sweep.out_dir) / METRICS_FILE
    if path is None or not metrics.is_file():
        return None
    records = read_metrics(metrics)
    if records[-1].get("step", 0) < run_config(sweep, run).train.steps:
        return None
    text = "".join(json.dumps(compact_record(r), separators=(",", ":")) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.encode())  # mtime 0 and no name: the same records give the same bytes
    tmp.replace(path)
    return path


def run_records(sweep: Sweep, run: Run) -> list[dict]:
    """The run's records: from its run directory, or from the archive when that reaches further."""
    metrics = run.run_dir(sweep.out_dir) / METRICS_FILE
    try:
        local = read_metrics(metrics) if metrics.is_file() else []
    except ValueError:  # a run that started but has logged no step yet
        local = []
    path = archive_path(sweep, run)
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as fh:
            archived = [json.loads(line) for line in fh if line.strip()]
        if archived and (not local or archived[-1].get("step", 0) > local[-1].get("step", 0)):
            return archived
    return local

"""Per-step training metrics: a JSON-lines log, optional TensorBoard and W&B scalars, a progress line.

Only rank 0 writes. Every other rank builds the same objects with ``enabled=False`` so the trainer
never branches on its rank; those objects do nothing.

One record per logged step, one JSON object per line of ``<run_dir>/metrics.jsonl``::

    {"step": 12, "loss": 3.1, "lr": 0.001, "grad_norm": 0.8, "tokens_per_s": 5000.0,
     "gatepro": true, "val_loss": 3.0,                       # val_loss only on eval steps
     "moe": [{"layer": 0, "zero_token_experts": 3, "max_load": 120, "mean_load": 64.0,
              "aux_loss": 1.01, "z_loss": 2.3, "dropped_tokens": 0,
              "gatepro_penalised": 40, "gatepro_topk_changed": 2,  # losers; tokens whose set changed
              "partner_co_selection": 0.3,  # share of tokens with an expert and its most similar one
              "dead_experts": 5,  # experts with < 0.1/N of the assignments over the last 10 steps
              "tokens_per_expert": [...N ints...],
              "routing_margin": {"tokens": 2048, "tied": 0.0, "below_penalty": 0.001,
                                 "p10": .., "p50": .., "p90": .., "below": {"1e-6": .., ..}},
              "similarity": {"mean_cos": .., "mean_abs_cos": .., "mean_angle_deg": ..,
                             "spectral_entropy": .., "mean_nearest_cos": ..}},
             ...]}                                           # similarity only on some steps

The file is opened in append mode so a resumed run continues it; ``truncate_after(resume_step)``
first removes the records a killed run logged after its last checkpoint. With ``metrics.wandb`` the
same scalars as TensorBoard's go to a W&B run under ``<run_dir>/wandb`` (``wandb_run.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

from .wandb_run import WandbRun, import_wandb

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Top-level numeric fields sent to TensorBoard under their own name.
TOP_LEVEL_SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "val_loss")


# --------------------------------------------------------------------------------------- reading


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl file, sorted by step, one per step (the last one written wins).

    A line that does not parse is skipped with a warning: the usual cause is a run killed in the
    middle of writing its last line. Raises ValueError naming the file when it is missing or
    holds no record.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"metrics file not found: {path}")
    by_step: dict[int, dict] = {}
    unstepped: list[dict] = []
    with path.open("r", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            record = _parse_line(line, path, line_no)
            if record is None:
                continue
            if isinstance(record.get("step"), int):
                by_step[record["step"]] = record
            else:
                unstepped.append(record)
    if not by_step:
        raise ValueError(f"metrics file has no step records: {path}")
    if unstepped:
        log.warning("%s: ignored %d record(s) without an integer 'step'", path, len(unstepped))
    return [by_step[step] for step in sorted(by_step)]


def _parse_line(line: str, path: Path, line_no: int) -> dict | None:
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        log.warning("%s:%d: skipping a line that is not JSON (truncated write?)", path, line_no)
        return None
    if not isinstance(record, dict):
        log.warning("%s:%d: skipping a line that is not a JSON object", path, line_no)
        return None
    return record


# --------------------------------------------------------------------------------------- writing


def flatten_scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one record: ``loss``, ``lr``, ... and ``moe/<layer>/<field>``.

    Per-layer similarity stats become ``moe/<layer>/similarity/<stat>``; lists (tokens_per_expert)
    are left out. Booleans become 0/1 so the GatePro schedule shows up as a step function.
    """
    scalars: dict[str, float] = {}
    for name in TOP_LEVEL_SCALARS:
        if _is_number(record.get(name)):
            scalars[name] = float(record[name])
    if isinstance(record.get("gatepro"), bool):
        scalars["gatepro"] = float(record["gatepro"])
    for position, layer_stats in enumerate(record.get("moe") or []):
        layer = layer_stats.get("layer", position)
        for field, value in layer_stats.items():
            if field == "layer":
                continue
            if _is_number(value) or isinstance(value, bool):
                scalars[f"moe/{layer}/{field}"] = float(value)
            elif isinstance(value, dict):
                for stat, stat_value in value.items():
                    if _is_number(stat_value):
                        scalars[f"moe/{layer}/{field}/{stat}"] = float(stat_value)
    return scalars


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_default(value: Any) -> Any:
    # Tensors and numpy values that slipped into a record: scalars and arrays both have tolist().
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"metrics record field of type {type(value).__name__} is not JSON-serialisable")


class MetricsWriter:
    """Appends one JSON line per record to ``run_dir/metrics.jsonl`` (rank 0 only).

    With ``tensorboard=True`` the numeric fields also go to ``run_dir/tensorboard`` when
    ``torch.utils.tensorboard`` can be imported; when it cannot, one info line says so and the
    JSON log is written as usual.

    With ``wandb="offline"`` or ``"online"`` the same scalars go to a W&B run (project
    ``wandb_project``, ``config`` as its config), each at its record's step. The run opens at
    ``truncate_after`` -- continuing the stored run id when records were kept, a new one when the
    log starts over -- or at the first ``write``; ``close`` finishes it.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool, tensorboard: bool = True,
                 wandb: str | None = None, wandb_project: str = "gatepro_dist", config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._tb_writer = None
        self._wandb: WandbRun | None = None
        if not enabled:
            return
        if wandb is not None:
            import_wandb(wandb)  # a missing package fails here, before anything is written
            self._wandb = WandbRun(self.run_dir, wandb, wandb_project, config)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open_for_append()
        if tensorboard:
            self._tb_writer = _make_summary_writer(self.run_dir / TENSORBOARD_DIR, purge_step=None)

    def _open_for_append(self) -> None:
        # A run killed mid-line leaves no trailing newline; start on a fresh line so the next
        # record stays parseable (the broken line is skipped by readers and by truncate_after).
        needs_newline = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._file = self.path.open("a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError(f"MetricsWriter for {self.path} is closed")
        self._file.write(json.dumps(record, default=_json_default) + "\n")
        self._file.flush()  # a crash loses at most the line being written
        if not isinstance(record.get("step"), int):
            return
        scalars = flatten_scalars(record)
        if self._tb_writer is not None:
            for tag, value in scalars.items():
                self._tb_writer.add_scalar(tag, value, global_step=record["step"])
            self._tb_writer.flush()
        if self._wandb is not None:
            if not self._wandb.started:
                self._wandb.start(continue_run=True)
            self._wandb.log(record["step"], scalars)

    def truncate_after(self, step: int) -> int:
        """Keep only records with ``step < step``; returns how many lines were removed.

        Call it when resuming from a checkpoint taken at ``step``: records a killed run logged at
        or after that step are about to be logged again. The file is replaced atomically (tmp
        file + os.replace), so a crash here leaves either the old or the new file. TensorBoard
        events from ``step`` on are purged as well.
        """
        if not self.enabled:
            return 0
        if self._file is not None:
            self._file.close()
            self._file = None
        kept: list[str] = []
        removed = 0
        if self.path.is_file():
            with self.path.open("r", encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    record = _parse_line(line, self.path, line_no)
                    if record is None:
                        removed += bool(line.strip())
                        continue
                    record_step = record.get("step")
                    if isinstance(record_step, int) and record_step >= step:
                        removed += 1
                        continue
                    kept.append(line if line.endswith("\n") else line + "\n")
            tmp_path = self.path.with_name(self.path.name + ".tmp")
            with tmp_path.open("w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_path, self.path)
        if removed:
            log.info("%s: removed %d record(s) at step >= %d before resuming", self.path, removed, step)
        self._open_for_append()
        if self._tb_writer is not None:
            # SummaryWriter can only purge when it is created: replace it.
            self._tb_writer.close()
            self._tb_writer = _make_summary_writer(self.run_dir / TENSORBOARD_DIR, purge_step=step)
        if self._wandb is not None and not self._wandb.started:
            # W&B history cannot be cut back: the records dropped above stay in the W&B run as first
            # logged, and W&B ignores the steps logged again (only larger steps are accepted).
            self._wandb.start(continue_run=bool(kept))
        return removed

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _make_summary_writer(log_dir: Path, purge_step: int | None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed; metrics go to %s only", METRICS_FILE)
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


# -------------------------------------------------------------------------------------- progress


class ProgressBar:
    """One status line on stderr for rank 0: step/total, loss, tokens/s, ETA.

    On a terminal the line is redrawn in place (at most ~10 times a second). When stderr is not a
    terminal (Slurm logs, CI, ``2> file``) a plain line is printed at the first update, each time
    another ~10% of the steps is done, and at the last step, so log files stay short.
    ``update(step)`` takes the number of steps completed so far (1-based: ``step == total_steps``
    is the end).
    """

    REDRAW_INTERVAL_S = 0.1

    def __init__(
        self,
        total_steps: int,
        enabled: bool,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total_steps = max(int(total_steps), 1)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._print_every = max(1, math.ceil(self.total_steps / 10))
        self._next_plain_step: int | None = None  # None: nothing printed yet
        self._first_step: int | None = None
        self._first_time = 0.0
        self._last_draw_time = -math.inf
        self._drawn_width = 0

    def update(self, step: int, loss: float | None = None, tokens_per_s: float | None = None) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if self._first_step is None:
            # ETA is measured from the first update so a resumed run does not count old steps.
            self._first_step, self._first_time = step, now
        line = self._format(step, loss, tokens_per_s, now)
        finished = step >= self.total_steps
        if self._is_tty:
            if finished or now - self._last_draw_time >= self.REDRAW_INTERVAL_S:
                self._last_draw_time = now
                padding = " " * max(0, self._drawn_width - len(line))
                self.stream.write("\r" + line + padding)
                self.stream.flush()
                self._drawn_width = len(line)
        elif self._next_plain_step is None or step >= self._next_plain_step or finished:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._next_plain_step = (step // self._print_every + 1) * self._print_every

    def _format(self, step: int, loss: float | None, tokens_per_s: float | None, now: float) -> str:
        fraction = min(max(step / self.total_steps, 0.0), 1.0)
        parts = [f"step {step}/{self.total_steps} ({fraction:4.0%})"]
        if self._is_tty:
            filled = int(fraction * 20)
            parts.insert(0, "[" + "#" * filled + "." * (20 - filled) + "]")
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        parts.append(f"ETA {self._eta(step, now)}")
        return " | ".join(parts)

    def _eta(self, step: int, now: float) -> str:
        steps_done = step - (self._first_step or 0)
        elapsed = now - self._first_time
        if step >= self.total_steps:
            return "0:00:00"
        if steps_done <= 0 or elapsed <= 0:
            return "?"
        seconds = round((self.total_steps - step) * elapsed / steps_done)
        hours, rest = divmod(seconds, 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"

    def close(self) -> None:
        if self.enabled and self._is_tty and self._drawn_width:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_width = 0

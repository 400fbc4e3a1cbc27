"""``metrics.wandb``: the scalars of metrics.jsonl, also sent to a Weights & Biases run (rank 0 only).

``MetricsWriter`` owns one ``WandbRun``. The W&B files live under ``<run_dir>/wandb`` (W&B's own
layout: ``offline-run-<time>-<id>/run-<id>.wandb`` offline, ``run-<time>-<id>/`` online); the
run id is kept in ``<run_dir>/wandb/run_id`` so a resumed training run continues the same W&B run
(every launch offline writes its own ``offline-run-*`` directory with that id; ``wandb sync``
uploads them into one run). The id is reused exactly when metrics.jsonl is continued: a run that
starts over in the same directory (nothing kept by ``truncate_after``) gets a new id.

Offline needs no network. W&B reads its mode partly from the environment when it first sets itself
up in a process (its own telemetry exporter is built from those process-wide settings, not from
the run's), so ``WANDB_MODE``, ``WANDB_SILENT`` and ``WANDB_CONSOLE`` are set while ``wandb.init``
runs and every variable it changed, W&B's service token included, is put back afterwards: the
caller's environment is the same before and after. Console capture is off (our progress line
writes to stderr itself); offline, system metrics and machine probing are off too.

W&B's service process writes a run's ``.wandb`` file when it closes the run's stream, which it does
after ``run.finish()`` has returned (a process that exits without finishing leaves it empty). So an
offline ``finish`` here waits, up to ``FLUSH_TIMEOUT_S``, until the file ends with the run's exit
record: when the writer is closed, the offline run is on disk. ``read_transaction_log`` reads such a
file (wandb ships the record classes, ``wandb.proto``; 0.31 ships no Python reader of the log).
"""
from __future__ import annotations

import logging
import os
import secrets
import string
import struct
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

WANDB_DIR = "wandb"
RUN_ID_FILE = "run_id"
FLUSH_TIMEOUT_S = 60.0
MISSING_WANDB = "metrics.wandb={mode!r} needs the wandb package, which is not installed; " \
                "pip install 'gatepro_dist[wandb]' or set metrics.wandb=null"


def import_wandb(mode: str):
    """``import wandb``, or ImportError with the one-line fix (config validation checks first)."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(MISSING_WANDB.format(mode=mode)) from error
    return wandb


class WandbRun:
    """One W&B run for one training run directory; ``start`` opens it, ``log`` sends a step's
    scalars, ``finish`` closes it. Nothing is imported or written before ``start``."""

    def __init__(self, run_dir: Path, mode: str, project: str, config: dict | None):
        self.run_dir, self.mode, self.project, self.config = Path(run_dir), mode, project, config
        self._run = None

    @property
    def started(self) -> bool:
        return self._run is not None

    @property
    def id_file(self) -> Path:
        return self.run_dir / WANDB_DIR / RUN_ID_FILE

    def start(self, continue_run: bool) -> None:
        """Open the W&B run: the stored id when ``continue_run`` and one is stored, else a new id
        (stored before the run is opened, so a crash in between still continues it)."""
        wandb = import_wandb(self.mode)
        run_id = self.id_file.read_text().strip() if continue_run and self.id_file.is_file() else None
        if not run_id:
            run_id = _new_run_id()
            self.id_file.parent.mkdir(parents=True, exist_ok=True)
            self.id_file.write_text(run_id + "\n")
        offline = self.mode == "offline"
        settings = wandb.Settings(
            mode=self.mode, silent=True, console="off", reinit="create_new",  # leave any other run alone
            x_disable_stats=offline, x_disable_machine_info=offline)
        with _scoped_environment(WANDB_MODE=self.mode, WANDB_SILENT="true", WANDB_CONSOLE="off"):
            self._run = wandb.init(project=self.project, id=run_id, resume="allow", dir=str(self.run_dir),
                                   config=self.config, settings=settings)
        log.info("W&B run %s (%s) in %s", run_id, self.mode, self._run.dir)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self._run.log(scalars, step=step)

    def finish(self) -> None:
        if self._run is None:
            return
        log_file = Path(self._run.settings.sync_file)
        self._run.finish()
        self._run = None
        if self.mode == "offline" and not _wait_for_exit_record(log_file, FLUSH_TIMEOUT_S):
            log.warning("W&B has not finished writing %s after %.0f s; it may still be completing",
                        log_file, FLUSH_TIMEOUT_S)


def _wait_for_exit_record(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = read_transaction_log(path)
        except (OSError, ValueError):  # not there yet, or caught mid-write
            records = []
        if records and records[-1].WhichOneof("record_type") == "exit":
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# W&B's transaction log: a leveldb-style log (32 KiB blocks of records, each with a CRC-32 of its
# type byte and data, a length and a type; a message larger than its block is split into
# first/middle/last parts) after a 7-byte file header, holding serialized wandb.proto Records.
_LOG_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_transaction_log(path: str | os.PathLike) -> list:
    """Every ``wandb.proto`` Record of a ``run-<id>.wandb`` file, in order; ValueError on a file that
    is not one or a record whose checksum does not match. An unfinished last message is left out."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < _LOG_HEADER.size or _LOG_HEADER.unpack_from(data) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path} is not a W&B transaction log")
    records, pending, pos = [], b"", _LOG_HEADER.size
    while pos + _RECORD_HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _RECORD_HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        checksum, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + _RECORD_HEADER.size: pos + _RECORD_HEADER.size + length]
        if len(chunk) < length:
            break  # the writer is mid-record
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != checksum:
            raise ValueError(f"{path}: record at byte {pos} fails its checksum")
        pos += _RECORD_HEADER.size + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _new_run_id(length: int = 8) -> str:
    """A random base-36 id, the form W&B's own ids take."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(length))


@contextmanager
def _scoped_environment(**values: str):
    """Set ``values`` in ``os.environ`` for the block; afterwards every variable that differs from
    before (set here or by the code in the block) is restored or removed, one key at a time."""
    before = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        for key in set(os.environ) | set(before):
            if os.environ.get(key) != before.get(key):
                if key in before:
                    os.environ[key] = before[key]
                else:
                    del os.environ[key]

"""Run the GPU acceptance sections one child process each, under one time budget, rewriting the report
after every change, so that a hang costs its section and never the report.

A section is a function ``run(options, note) -> dict`` named by ``"module:function"`` (``Section.target``).
``gpu_child`` imports and calls it in a fresh Python process; ``note(key, value)`` writes what the
section has found so far into its result file, which the report keeps when the section is cut.

States of a section in the report: ``pending`` (not started yet), ``running``, ``passed``, ``failed``,
``timeout`` (cut at its own timeout, or at what was left of the budget; ``elapsed_s`` says when),
``skipped: budget`` (not started: less than ``min_start_s`` of the budget was left), ``needs CUDA``
(the child found no GPU and did not run the section), ``skipped: <why>`` (e.g. megatron-core is
not installed) and ``interrupted`` (the command itself was stopped: Ctrl-C or SIGTERM).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .gpu_report import write_report

CHILD = "gatepro_dist.experiments.bench.gpu_child"
GRACE_S = 5.0  # after SIGTERM, before SIGKILL
LOG_TAIL = 4000  # characters of a section's log kept in the report when it did not pass


@dataclass(frozen=True)
class Section:
    name: str
    target: str  # "module:function" run in a child process
    timeout_s: float
    needs_cuda: bool = True
    what: str = ""  # one line for the report's table
    options: dict = field(default_factory=dict)  # merged over the command's options for this section


@dataclass(frozen=True)
class ChildOutcome:
    status: str  # "finished", "timeout" or "crashed" (exited without a result)
    elapsed_s: float
    returncode: int | None
    result: dict | None  # the section's final result (with "status"), when it finished
    partial: dict  # what it noted before it stopped
    log_tail: str


def run_child(target: str, options: dict, timeout_s: float, log_path: Path, needs_cuda: bool = False,
              new_session: bool = True) -> ChildOutcome:
    """Run ``target`` in a child Python process; cut it (SIGTERM, then SIGKILL) after ``timeout_s``.

    ``new_session``: the child leads its own process group, and the cut reaches everything it
    started (pytest, a training phase). A section that starts children itself passes False, so
    that they stay in its group and go with it when it is cut.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_section_") as scratch:
        options_path, result_path = Path(scratch) / "options.json", Path(scratch) / "result.json"
        options_path.write_text(json.dumps({**options, "deadline": time.time() + timeout_s}))
        command = [sys.executable, "-m", CHILD, target, str(options_path), str(result_path)]
        if needs_cuda:
            command.append("--needs-cuda")
        began = time.monotonic()
        with log_path.open("w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=new_session, env=_child_env())
            try:
                returncode = child.wait(timeout=max(timeout_s, 0.0))
                status = "finished"
            except subprocess.TimeoutExpired:
                _cut(child, new_session)
                returncode, status = child.returncode, "timeout"
            except BaseException:  # Ctrl-C, or SIGTERM made SystemExit (gpu.main): take the child along
                _cut(child, new_session)
                raise
        elapsed = round(time.monotonic() - began, 2)
        written = _read_json(result_path)
    result = written.get("result")
    if status == "finished" and result is None:
        status = "crashed"
    return ChildOutcome(status, elapsed, returncode, result, written.get("partial", {}), _tail(log_path))


def run_sections(sections: list[Section], out_dir: str | Path, budget_s: float, options: dict,
                 header: dict | None = None, min_start_s: float = 20.0,
                 on_change: Callable[[dict], None] | None = None) -> dict:
    """Run ``sections`` in order within ``budget_s`` seconds; the report in ``out_dir`` is rewritten
    before the first section, when each starts and when each ends. Returns the final report."""
    out = Path(out_dir)
    began = time.monotonic()
    report = {**(header or {}), "budget_s": budget_s, "elapsed_s": 0.0,
              "sections": {s.name: {"status": "pending", "what": s.what, "timeout_s": s.timeout_s}
                           for s in sections}}

    def save() -> None:
        report["elapsed_s"] = round(time.monotonic() - began, 2)
        write_report(report, out)
        if on_change:
            on_change(report)

    save()
    for section in sections:
        entry = report["sections"][section.name]
        left = budget_s - (time.monotonic() - began)
        if left < min_start_s:
            entry.update(status="skipped: budget", budget_left_s=round(max(left, 0.0), 2))
            save()
            continue
        timeout = min(section.timeout_s, left)
        entry.update(status="running", timeout_s=round(timeout, 2),
                     cut_by="budget" if timeout < section.timeout_s else "section timeout")
        save()
        try:
            outcome = run_child(section.target, {**options, **section.options}, timeout,
                                out / "logs" / f"{section.name}.log", section.needs_cuda)
        except BaseException:
            entry.update(status="interrupted", error="the command itself was stopped while this section ran")
            save()
            raise
        entry.update(_entry(outcome))
        if entry["status"] != "timeout":
            entry.pop("cut_by", None)
        save()
    return report


def exit_on_sigterm() -> None:
    """Make SIGTERM (a job's or a device lease's time limit) a ``SystemExit`` in this process, so that
    ``run_sections`` ends the running section's process and records it as ``interrupted``."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _entry(outcome: ChildOutcome) -> dict:
    if outcome.status == "timeout":
        entry = {"status": "timeout", "elapsed_s": outcome.elapsed_s, "partial": outcome.partial}
    elif outcome.status == "crashed":
        entry = {"status": "failed", "elapsed_s": outcome.elapsed_s, "partial": outcome.partial,
                 "error": f"the section's process exited with code {outcome.returncode} and wrote no result"}
    else:
        entry = {**outcome.result, "elapsed_s": outcome.elapsed_s}
    if entry["status"] not in ("passed", "needs CUDA") and not entry["status"].startswith("skipped"):
        entry["log_tail"] = outcome.log_tail
    return entry


def _cut(child: subprocess.Popen, own_group: bool) -> None:
    """End the child we started (and, when it leads its own group, what it started), by its id."""
    def signal_child(sig):
        try:
            os.killpg(child.pid, sig) if own_group else child.send_signal(sig)
        except ProcessLookupError:  # it ended on its own meanwhile
            pass

    signal_child(signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        signal_child(signal.SIGKILL)
        child.wait()


def _child_env() -> dict:
    """The parent's environment, with this package importable even when it is run from a checkout."""
    root = str(Path(__file__).resolve().parents[3])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join((root, path))}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # never written, or cut while writing (written by rename, so rare)
        return {}


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL:]
    except OSError:
        return ""

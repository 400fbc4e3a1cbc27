"""One section of the GPU acceptance run, in its own process (started by ``gpu_run.run_child``).

    python -m gatepro_dist.experiments.bench.gpu_child MODULE:FUNCTION OPTIONS.json RESULT.json [--needs-cuda]

Calls ``FUNCTION(options, note)`` and writes ``{"result": {...}}`` to RESULT.json, the section's dict
with its ``status``: ``passed``/``failed`` from its ``passed`` key, ``skipped: <why>`` when it says
``skipped``. ``note(key, value)`` writes ``{"partial": {...}}`` first, so that a section cut at its
timeout still leaves what it had found. With ``--needs-cuda`` on a machine where torch sees no GPU the
function is not called at all: the result is ``needs CUDA`` and why.

torch is imported only by sections that use it (and for the CUDA check), so the orchestration's own
tests run children in a fraction of a second.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
from pathlib import Path


def write_json(path: Path, payload: dict) -> None:
    """Written beside and renamed into place: a reader never sees half a file."""
    scratch = path.with_name(path.name + ".tmp")
    scratch.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(scratch, path)


def cuda_missing() -> str | None:
    import torch

    if torch.cuda.is_available():
        return None
    return (f"needs CUDA: torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}) sees no GPU "
            "here; this section ran nothing")


def status_of(result: dict) -> str:
    if result.get("skipped"):
        return f"skipped: {result['skipped']}"
    return "passed" if result.get("passed") else "failed"


def run(target: str, options: dict, result_path: Path, needs_cuda: bool) -> int:
    partial: dict = {}

    def note(key: str, value) -> None:
        partial[key] = value
        write_json(result_path, {"partial": partial})

    if needs_cuda and (missing := cuda_missing()):
        write_json(result_path, {"result": {"status": "needs CUDA", "reason": missing}})
        return 0
    try:
        module, function = target.split(":")
        result = dict(getattr(importlib.import_module(module), function)(options, note))
        result["status"] = status_of(result)
    except Exception as err:  # the report says what went wrong; the next section still runs
        traceback.print_exc()
        result = {**partial, "status": "failed", "passed": False, "error": f"{type(err).__name__}: {err}",
                  "traceback_tail": traceback.format_exc()[-3000:]}
    write_json(result_path, {"result": result, "partial": partial})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    needs_cuda = "--needs-cuda" in args
    target, options_path, result_path = [a for a in args if a != "--needs-cuda"]
    options = json.loads(Path(options_path).read_text())
    return run(target, options, Path(result_path), needs_cuda)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A section's process groups are closed by the section; NCCL or gloo threads that something
    # else still holds could abort the interpreter's finalisation after the result is written.
    os._exit(code)

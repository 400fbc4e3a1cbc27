"""The GPU acceptance run: one command, one GPU, at most ``--budget-s`` seconds (540 by default).

    gatepro-bench gpu [--out gpu_report] [--budget-s 540] [--sections env,...] [--skip tests,...]
                      [--timeout SECTION=SECONDS ...] [--tokens 4096,16384,32768 --hidden 1024 ...]

Run it from a checkout of the repository (the ``resume`` and ``fsdp`` sections train
``configs/quickstart.yaml``, the ``tests`` section runs tests/). Each section runs in a process of its
own with its own timeout, in the order of ``SECTIONS``, and ``gpu_report.json`` / ``gpu_report.md`` in
``--out`` are rewritten before the first and after every section: a section that hangs is cut at its
timeout and recorded as ``timeout``; a section that would start with too little of the budget left is
recorded as ``skipped: budget`` (gpu_run.py). docs/gpu_acceptance.md says what each section checks.

Exits 0 when every section ran and passed (``skipped: <why>``, e.g. megatron-core not installed, does
not count), 1 otherwise, and 2 with one line on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

from .gpu_report import verdict
from .gpu_run import Section, exit_on_sigterm, run_sections

_S = "gatepro_dist.experiments.bench.gpu_sections."
SECTIONS = (
    Section("env", _S + "env:environment", 60, needs_cuda=False,
            what="GPU, driver, CUDA, NCCL, cuBLAS, cuDNN and torch versions"),
    Section("collectives", _S + "collectives:collectives", 90,
            what="the collectives our code calls, on the trainer's cpu:gloo,cuda:nccl group (world 1)"),
    Section("sync_debug", _S + "sync_debug:sync_debug", 90,
            what='one MoE layer fwd+bwd under torch.cuda.set_sync_debug_mode("error")'),
    Section("numerics", _S + "numerics:numerics", 120,
            what="bf16 vs fp32 (TF32 off): output, gradients, aux/z losses; empty experts; capacity"),
    Section("resume", _S + "training:resume", 240,
            what="stop at step 10 with a checkpoint, resume to 15 in a new process, vs 15 in one go"),
    Section("timing", _S + "timing:timing", 180,
            what="grouped GEMMs, our layer (fp32 / bf16 params), Megatron's MoELayer: ms, TFLOP/s, peak memory"),
    Section("fsdp", _S + "training:fsdp", 150,
            what="parallel.dp_shard's FSDP2 path on one GPU: vs replicated, and its resume"),
    Section("megatron_check", _S + "megatron:megatron_check", 150,
            what="integrations/megatron_gpu_check.py: Megatron's layer beside ours, a Megatron GPT run"),
    Section("tests", _S + "device_tests:device_tests", 180,
            what="tests/test_bf16.py and tests/test_routing.py with GATEPRO_TEST_DEVICE=cuda"),
)
NAMES = tuple(s.name for s in SECTIONS)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(parser, option: str, text: str) -> tuple[str, ...]:
    names = tuple(s for s in text.split(",") if s)
    unknown = [s for s in names if s not in NAMES]
    if unknown:
        parser.error(f"{option} {','.join(unknown)}: not a section; choose from {','.join(NAMES)}")
    return names


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_report", help="directory for gpu_report.json, gpu_report.md, logs/, runs/")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="seconds for the whole run; no section starts with less than --min-start-s left")
    parser.add_argument("--min-start-s", type=float, default=20.0, help="least budget left to start a section")
    parser.add_argument("--sections", default=",".join(NAMES), help="comma-separated sections to run, in this order")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out, of {','.join(NAMES)}")
    parser.add_argument("--timeout", action="append", default=[], metavar="SECTION=SECONDS",
                        help="a section's own timeout (repeatable)")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the model the resume and fsdp sections train")
    parser.add_argument("--resume-steps", type=int, default=15)
    parser.add_argument("--resume-at", type=int, default=10, help="the step the interrupted run stops after")
    parser.add_argument("--fsdp-steps", type=int, default=8)
    parser.add_argument("--fsdp-at", type=int, default=5)
    parser.add_argument("--tokens", type=_ints, default=[4096, 16384, 32768], help="token counts of the timing rows")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048, help="expert_ffn_dim")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (after 5 warm-up rounds)")
    parser.add_argument("--megatron-steps", type=int, default=20, help="GPT training steps of megatron_check")
    args = parser.parse_args(argv)
    skip = _names(parser, "--skip", args.skip)
    args.sections = tuple(s for s in _names(parser, "--sections", args.sections) if s not in skip)
    args.skip = skip
    timeouts = {}
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        _names(parser, "--timeout", name)
        try:
            timeouts[name] = float(seconds)
        except ValueError:
            parser.error(f"--timeout {item}: give SECTION=SECONDS")
    args.timeout = timeouts
    for name in ("hidden", "ffn"):
        if getattr(args, name) % 8:
            parser.error(f"--{name} {getattr(args, name)} is not a multiple of 8, which the bf16 grouped GEMM needs")
    if args.experts < args.top_k or not args.tokens or min(args.tokens) < 1 or args.repeats < 1:
        parser.error("need --experts >= --top-k, positive --tokens and --repeats")
    if not 0 < args.resume_at < args.resume_steps or not 0 < args.fsdp_at < args.fsdp_steps:
        parser.error("need 0 < --resume-at < --resume-steps and 0 < --fsdp-at < --fsdp-steps")
    return args


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU acceptance run, or None when it can."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"needs a CUDA GPU, and torch {torch.__version__} sees none (CUDA build: {torch.version.cuda or 'none'}); "
            "run it on a GPU machine, see docs/gpu_acceptance.md")


def chosen_sections(args: argparse.Namespace) -> list[Section]:
    by_name = {s.name: s for s in SECTIONS}
    return [dataclasses.replace(by_name[n], timeout_s=args.timeout.get(n, by_name[n].timeout_s)) for n in args.sections]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    problem = cuda_problem()
    if problem:
        print(f"{prog or 'gatepro_dist.experiments.bench.gpu'}: error: {problem}", file=sys.stderr)
        return 2
    options = {k: v for k, v in vars(args).items() if k not in ("sections", "skip", "timeout")}
    command = " ".join(["gatepro-bench gpu", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])

    said: dict[str, str] = {}

    def progress(report: dict) -> None:  # one line per section state, as the report is rewritten
        for name, body in report["sections"].items():
            if body["status"] != "pending" and said.get(name) != body["status"]:
                said[name] = body["status"]
                print(f"[{report['elapsed_s']:6.1f} s] {name}: {body['status']}", flush=True)

    exit_on_sigterm()
    report = run_sections(chosen_sections(args), args.out, args.budget_s, options, {"command": command},
                          min_start_s=args.min_start_s, on_change=progress)
    print(f"{verdict(report)}; wrote {args.out}/gpu_report.json and {args.out}/gpu_report.md")
    return 0 if verdict(report) == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())

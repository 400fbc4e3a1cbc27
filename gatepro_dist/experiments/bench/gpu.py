"""The GPU acceptance run: one command that checks and times bf16 on one CUDA GPU (about 6 minutes on an H100/H200).

    gatepro-bench gpu [--out gpu_report] [--steps 30] [--tokens 16384 --hidden 1024 --ffn 2048
                       --experts 16 --top-k 2 --repeats 20] [--skip tests,train,layer,megatron]

Run it from a checkout of the repository (it reads configs/quickstart.yaml and runs tests/), after the
offline install that docs/benchmarks.md lists. Sections, each reported even when another fails:

1. ``tests``: pytest on the device-aware tests (``GATEPRO_TEST_DEVICE=cuda``): the expert GEMMs' bf16
   operands, the router's fp32 guard, the training numerics (tests/test_bf16.py and the others in ``TESTS``).
2. ``layer_check``: on the GPU, our MoE layer's bf16 grouped-GEMM path against the fp32 per-expert loop:
   output and input gradient within bf16 rounding; the experts' grouped_mm sees bf16 operands.
3. ``train``: the quickstart model (ep=1) trains ``--steps`` steps in bf16 on an NCCL process group of one
   rank; the loss must fall.
4. ``layer``: CUDA-event times of one MoE layer fwd+bwd in bf16: ours (grouped GEMM), a dense bf16 matmul
   doing the experts' FLOPs, and Megatron-core's ``MoELayer`` at the same configuration (``SequentialMLP``;
   ``TEGroupedMLP`` too when Transformer Engine is importable); TFLOP/s of the experts' GEMM work.
5. ``megatron_check``: integrations/megatron_gpu_check.py's layer check in bf16 (grouped GEMM) and its GPT run.

Writes ``gpu_report.json`` and ``gpu_report.md`` into ``--out``; exits 0 when every section that ran
passed, 1 otherwise, and 2 with one line on a machine without CUDA.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from .gpu_report import dense_shapes, expert_gemm_flops, passed, timing_row, write_report

SECTIONS = ("tests", "train", "layer", "megatron")
TESTS = ("tests/test_bf16.py", "tests/test_routing.py", "tests/test_gpu_bench.py")


def parse_args(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_report", help="directory for gpu_report.json and gpu_report.md")
    parser.add_argument("--config", default="configs/quickstart.yaml", help="the model trained by the train section")
    parser.add_argument("--steps", type=int, default=30, help="training steps of the train section")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens through the timed layer")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2048, help="expert_ffn_dim")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (after 5 warm-up rounds)")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to skip, of {','.join(SECTIONS)}")
    args = parser.parse_args(argv)
    args.skip = tuple(s for s in args.skip.split(",") if s)
    unknown = [s for s in args.skip if s not in SECTIONS]
    if unknown:
        parser.error(f"--skip {','.join(unknown)}: not a section; choose from {','.join(SECTIONS)}")
    for name in ("hidden", "ffn"):
        if getattr(args, name) % 8:
            parser.error(f"--{name} {getattr(args, name)} is not a multiple of 8, which the bf16 grouped GEMM needs")
    if args.experts < args.top_k or args.tokens < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("need --experts >= --top-k and positive --tokens, --steps and --repeats")
    return args


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU acceptance run, or None when it can."""
    if torch.cuda.is_available():
        return None
    return (f"needs a CUDA GPU, and torch {torch.__version__} sees none (CUDA build: {torch.version.cuda or 'none'}); "
            "run it on a GPU machine, see docs/benchmarks.md")


def run_tests(timeout_s: int = 180) -> dict:
    missing = [path for path in TESTS if not os.path.isfile(path)]
    if missing:
        return {"passed": False, "error": f"{missing[0]} not found: run from the repository root"}
    try:
        import pytest  # noqa: F401  (only: is it installed?)
    except ImportError:
        return {"passed": False, "error": "pytest is not installed: carry its wheel (docs/benchmarks.md)"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS]
    env = {**os.environ, "GATEPRO_TEST_DEVICE": "cuda", "PYTHONPATH": os.pathsep.join(filter(None, (
        os.getcwd(), os.environ.get("PYTHONPATH"))))}
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {"command": " ".join(["GATEPRO_TEST_DEVICE=cuda", "python", *command[1:]]), "returncode": done.returncode,
            "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - began, 1),
            "output_tail": "\n".join(lines[-30:]) if done.returncode else "", "passed": done.returncode == 0}


def bf16_layer_check(device: torch.device, tokens: int = 2048) -> dict:
    """Our layer on ``device``: bf16 grouped GEMM against the fp32 per-expert loop with the same weights."""
    from ...moe.layer import MoELayer, MoESpec

    torch.manual_seed(0)
    layer = MoELayer(MoESpec(hidden_size=256, num_experts=8, top_k=2, expert_ffn_dim=512)).to(device)
    x_TD = torch.randn(tokens, 256, device=device)
    grad_TD = torch.randn(tokens, 256, device=device)
    seen = []
    grouped_mm = torch.ops.aten._grouped_mm.default

    def run(bf16: bool, grouped: bool):
        layer.experts.grouped_gemm = grouped
        x = x_TD.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out, _ = layer(x)
        out.backward(grad_TD)
        return out.detach().float(), x.grad

    from torch.utils._python_dispatch import TorchDispatchMode

    class Operands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is grouped_mm:
                seen.append(tuple(str(a.dtype) for a in args[:2]))
            return func(*args, **(kwargs or {}))

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        reference_out, reference_grad = run(bf16=False, grouped=False)
        with Operands():
            out, grad = run(bf16=True, grouped=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    errors = {"output": rel(out, reference_out), "input_grad": rel(grad, reference_grad)}
    bf16_operands = bool(seen) and all(pair == ("torch.bfloat16", "torch.bfloat16") for pair in seen)
    # bf16 keeps 8 significant bits: a relative error of a few 2^-9 over d=256 / ffn=512 sums, not more.
    return {"grouped_mm_calls": len(seen), "bf16_operands": bf16_operands, "relative_errors": errors,
            "passed": bf16_operands and len(seen) == 6 and max(errors.values()) < 2e-2}


def train_quickstart(config: str, steps: int, device: torch.device, out_dir: Path) -> dict:
    from ...config import load_config
    from ...config_checks import validate
    from ...train.engine import train
    from ...train.parallel import build_parallel_groups

    cfg = validate(load_config(config, ["parallel.ep=1", f"train.steps={steps}", "train.dtype=bf16",
                                        f"train.run_dir={out_dir / 'train'}", "train.resume=none",
                                        "train.progress=false", f"train.eval_every={steps}",
                                        f"train.save_every={steps}"]), 1)
    groups = build_parallel_groups(1, device.type)
    began = time.perf_counter()
    result = train(cfg, groups, device, log=lambda *_: None)
    seconds = time.perf_counter() - began
    losses = result.losses
    joined = torch.distributed.is_initialized()
    return {"backend": torch.distributed.get_backend() if joined else None,
            "world_size": torch.distributed.get_world_size() if joined else 1,
            "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1], "val_loss": result.val_loss,
            "seconds": round(seconds, 1), "passed": len(losses) == steps and losses[-1] < losses[0]}


def time_layers(args: argparse.Namespace, device: torch.device, megatron: bool) -> dict:
    from ...moe.layer import MoELayer, MoESpec
    from .device_timing import summary, time_steps_ms

    t, d, f, n, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    gen = torch.Generator(device=device).manual_seed(0)
    x_TD = torch.randn(t, d, device=device, generator=gen)
    grad_TD = torch.randn(t, d, device=device, generator=gen)
    ours = MoELayer(MoESpec(hidden_size=d, num_experts=n, top_k=k, expert_ffn_dim=f)).to(device)
    x_ours = x_TD.clone().requires_grad_()

    def ours_step():
        ours.zero_grad(set_to_none=True)
        x_ours.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16):  # as train.dtype=bf16: fp32 params, bf16 compute
            out, stats = ours(x_ours)
        torch.autograd.backward([out, stats.loss], [grad_TD, torch.ones_like(stats.loss)])

    m_, k_, n_ = dense_shapes(t, k, d, f)
    a = torch.randn(m_, k_, device=device, dtype=torch.bfloat16, generator=gen)
    w = torch.randn(k_, n_, device=device, dtype=torch.bfloat16, generator=gen)
    g = torch.randn(m_, n_, device=device, dtype=torch.bfloat16, generator=gen)

    def dense_step():  # forward, input gradient, weight gradient: the experts' FLOPs in three dense GEMMs
        torch.mm(a, w), torch.mm(g, w.t()), torch.mm(a.t(), g)

    steps = {"dense bf16 matmul, same FLOPs": dense_step, "ours, grouped GEMM (bf16 autocast)": ours_step}
    skipped = {}
    if megatron:
        from ...integrations.megatron_gpu_check import megatron_moe_layer, transformer_engine_version

        kinds = {"Megatron-core MoELayer, SequentialMLP (bf16)": False}
        if transformer_engine_version():
            kinds["Megatron-core MoELayer, TEGroupedMLP (bf16)"] = True
        else:
            skipped["TEGroupedMLP"] = "Transformer Engine is not importable"
        x_meg = x_TD.view(t, 1, d).to(torch.bfloat16).requires_grad_()
        grad_meg = grad_TD.view(t, 1, d).to(torch.bfloat16)
        for name, use_te in kinds.items():
            layer = megatron_moe_layer(device, d, f, n, k, torch.bfloat16, use_te, aux_loss_coeff=1e-2,
                                       z_loss_coeff=1e-3)
            steps[name] = _megatron_step(layer, x_meg, grad_meg)
    times = time_steps_ms(steps, args.repeats, 5, device)
    flops = expert_gemm_flops(t, k, d, f)
    dense = summary(times["dense bf16 matmul, same FLOPs"])["median_ms"]
    rows = [timing_row(name, summary(ms), flops, dense) for name, ms in times.items()]
    config = {"tokens": t, "hidden": d, "ffn": f, "experts": n, "top_k": k, "repeats": args.repeats}
    return {"config": config, "gflop": flops / 1e9, "rows": rows, "not_timed": skipped, "passed": True}


def _megatron_step(layer, x_SBD, grad_SBD):
    def step():
        layer.zero_grad(set_to_none=True)
        x_SBD.grad = None
        out, _bias = layer(x_SBD)
        out.backward(grad_SBD)
    return step


def _section(results: dict, name: str, run) -> None:
    try:
        results[name] = run()
    except Exception as err:  # report every section, even after one fails
        results[name] = {"passed": False, "error": f"{type(err).__name__}: {err}",
                         "output_tail": traceback.format_exc()[-3000:]}
    print(f"{name}: {'passed' if results[name].get('passed') else 'FAILED'}", flush=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    problem = cuda_problem()
    if problem:
        print(f"{prog or 'gatepro_dist.experiments.bench.gpu'}: error: {problem}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from ...integrations.megatron_gpu_check import transformer_engine_version

    out_dir = Path(args.out)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    try:
        import megatron.core as megatron_core
        megatron_version = megatron_core.__version__
    except Exception:  # not installed, or its import fails on this machine: the Megatron sections say so
        megatron_version = None
    results = {"env": {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                       "cuda": torch.version.cuda, "python": sys.version.split()[0],
                       "megatron_core": megatron_version, "transformer_engine": transformer_engine_version()},
               "args": vars(args)}
    if "tests" not in args.skip:
        _section(results, "tests", run_tests)
    _section(results, "layer_check", lambda: bf16_layer_check(device))
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)  # NCCL, world of one
    if "train" not in args.skip:
        _section(results, "train", lambda: train_quickstart(args.config, args.steps, device, out_dir))
    with_megatron = megatron_version is not None and "megatron" not in args.skip
    if with_megatron:
        from ...integrations.megatron_gpu_check import init_model_parallel_of_one
        try:
            init_model_parallel_of_one()
        except Exception as err:  # the other sections still run
            results["megatron_check"] = {"passed": False, "error": f"Megatron's parallel state: {type(err).__name__}: {err}"}
            with_megatron = False
    elif "megatron" not in args.skip:
        results["megatron_check"] = {"skipped": "megatron-core is not importable: carry its wheel (docs/benchmarks.md)"}
    if "layer" not in args.skip:
        _section(results, "layer", lambda: time_layers(args, device, with_megatron))
    if with_megatron:
        from ...integrations.megatron_gpu_check import run_checks
        _section(results, "megatron_check", lambda: run_checks(device, torch.bfloat16, 20))
    json_path, md_path = write_report(results, out_dir)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    if with_megatron:
        from megatron.core import parallel_state
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 0 if passed(results) else 1


if __name__ == "__main__":
    sys.exit(main())

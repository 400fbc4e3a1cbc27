"""Training throughput of the quickstart model: 1 vs 2 processes, MoE vs a dense model of equal
active parameters (its FFN is top_k x expert_ffn_dim wide), measured side by side in one run.

    python -m gatepro_dist.experiments.bench.throughput [--steps 40] [--config configs/quickstart.yaml]

Each variant is a real `gatepro-train` run (torchrun for 2 processes); tokens/s is the median
over the steps after a warm-up. Prints a table and the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ...config import load_config

ROOT = Path(__file__).resolve().parents[2]


def variants(cfg) -> list[tuple[str, int, list[str]]]:
    dense_width = cfg.moe.top_k * cfg.moe.expert_ffn_dim + cfg.moe.num_shared_experts * cfg.moe.effective_shared_expert_ffn_dim
    dense = [f"model.first_dense_layers={cfg.model.n_layers}", f"model.dense_ffn_dim={dense_width}"]
    return [
        ("moe  1 proc  ep=1", 1, ["parallel.ep=1"]),
        ("moe  2 procs ep=2", 2, ["parallel.ep=2"]),
        ("moe  2 procs ep=1", 2, ["parallel.ep=1"]),
        ("dense 1 proc", 1, ["parallel.ep=1", *dense]),
        ("dense 2 procs", 2, ["parallel.ep=1", *dense]),
    ]


def run_variant(config: str, nproc: int, overrides: list[str], steps: int, run_dir: Path) -> list[float]:
    common = [config, f"train.steps={steps}", f"train.run_dir={run_dir}", "train.progress=false",
              f"train.eval_every={steps}", "train.eval_batches=1", f"train.save_every={10 * steps}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gatepro_dist.cli.train", *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "gatepro_dist.cli.train", *common]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in records]


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, nproc, overrides) in enumerate(variants(cfg)):
            rates = run_variant(args.config, nproc, overrides, args.steps, Path(tmp) / str(i))
            results[name] = statistics.median(rates[args.warmup:] or rates)
    print(f"{'variant':<20} {'tokens/s (median)':>18}")
    for name, rate in results.items():
        print(f"{name:<20} {rate:>18,.0f}")
    print(f"moe 2 procs ep=2 / moe 1 proc: {results['moe  2 procs ep=2'] / results['moe  1 proc  ep=1']:.2f}x")
    print(f"moe / dense, 1 proc: {results['moe  1 proc  ep=1'] / results['dense 1 proc']:.2f}")
    print(f"moe ep=2 / dense, 2 procs: {results['moe  2 procs ep=2'] / results['dense 2 procs']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

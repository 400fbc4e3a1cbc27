"""gatepro-bench: the benchmarks behind docs/benchmarks.md, one subcommand each.

    gatepro-bench layer [--compare deepspeed] [...]   one MoE layer fwd+bwd (bench/layer.py)
    gatepro-bench throughput [...]                    training tokens/s, MoE vs dense (bench/throughput.py)
    gatepro-bench comm [...]                          bytes per layer, cost model vs counted (bench/comm.py)
    gatepro-bench extremes [...]                      memory with every token on one expert (bench/extremes.py)
    gatepro-bench checkpointing [...]                 memory and time with activation checkpointing (bench/checkpointing.py)
    gatepro-bench plan [...]                          gatepro-plan's bytes beside real ranks' (bench/plan.py)
    gatepro-bench gpu [...]                           the GPU acceptance run, one process per section, one budget (bench/gpu.py)
    gatepro-bench compile [...]                       training steps/s, eager vs train.compile (bench/compile.py)

Everything after the subcommand goes to that benchmark's own options (``gatepro-bench layer
--help``); ``python -m gatepro_dist.experiments.bench.<subcommand>`` runs the same code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "layer": "fwd+bwd of one MoE layer: plain vs GatePro, grouped GEMM vs loop, or ours vs DeepSpeed-MoE",
    "throughput": "training tokens/s of the quickstart model: MoE vs dense, 1 vs 2 processes",
    "comm": "communication per MoE layer: the cost model's bytes beside the counted bytes",
    "extremes": "peak memory of one layer when every token goes to one expert, dropless vs capacity",
    "checkpointing": "a training step's saved activations, peak memory and time: none vs moe vs block",
    "plan": "gatepro-plan's predicted held and peak bytes beside real gloo ranks', world 2 and 4",
    "gpu": "GPU acceptance in <= 540 s: versions, NCCL group, host syncs, bf16 vs fp32, resume, FSDP, timings",
    "compile": "training steps/s of the quickstart model: eager vs train.compile=true, side by side",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gatepro-bench", description=__doc__.splitlines()[0],
        epilog="\n".join(f"  {name:<11} {what}" for name, what in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, help="which benchmark")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="its options (gatepro-bench COMMAND --help)")
    args = parser.parse_args(argv)
    # Import only the chosen benchmark: each pulls in torch, the layer comparison also DeepSpeed.
    module = importlib.import_module(f"gatepro_dist.experiments.bench.{args.command}")
    return module.main(args.options, prog=f"gatepro-bench {args.command}")


if __name__ == "__main__":
    sys.exit(main())

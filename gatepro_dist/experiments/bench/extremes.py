"""Memory of one MoE layer's fwd+bwd when the router sends every token to one expert.

    gatepro-bench extremes [--tokens 8192 --hidden 512 --ffn 1024 --experts 16 --ep 2]

For balanced and for skewed routing (GATEPRO_FAULT's ``hot_expert``: expert 0's logit +1e4 for
every token), dropless and with ``capacity_factor=1.0``, on ``--ep`` gloo ranks: each rank's peak
memory of a step (the resident memory the step adds at its peak: VmHWM after it minus VmRSS before
it, after handing freed heap memory back with malloc_trim; median of 3 steps), the most rows one
of its experts computed, and the assignments dropped. Dropless, the rank holding the hot expert
computes every token of the EP group; with a capacity no expert computes more than the capacity.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ...cluster import faults
from ...cluster.spawn import run_on_ranks
from ...moe.layer import MoELayer, MoESpec
from .rounds import peak_memory_in_rounds

ROUNDS = 3


def _worker(rank: int, world: int, args: argparse.Namespace, hot: bool, capacity_factor) -> tuple:
    faults.install("hot_expert:expert=0" if hot else None)
    torch.manual_seed(rank)
    spec = MoESpec(hidden_size=args.hidden, num_experts=args.experts, top_k=2, expert_ffn_dim=args.ffn,
                   gatepro=False, capacity_factor=capacity_factor)
    layer = MoELayer(spec, ep_group=dist.group.WORLD if world > 1 else None)
    x_TD, grad_TD = torch.randn(args.tokens, args.hidden, requires_grad=True), torch.randn(args.tokens, args.hidden)

    def step():
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        out_TD, stats = layer(x_TD)
        torch.autograd.backward([out_TD, stats.loss], [grad_TD, torch.ones_like(stats.loss)])
        return stats

    stats = step()
    peak = peak_memory_in_rounds({"step": step}, ROUNDS, dist.barrier)["step"]
    return (float("nan") if peak is None else peak / 2**20), stats.expert_rows_max, stats.dropped_tokens


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--ep", type=int, default=2)
    args = parser.parse_args(argv)
    assignments = args.tokens * 2 * args.ep
    print(f"{'routing':<10}{'capacity':>10}{'rank':>6}{'peak MiB':>10}{'most rows/expert':>18}{'dropped':>16}")
    for hot in (False, True):
        for capacity_factor in (None, 1.0):
            results = run_on_ranks(args.ep, _worker, args, hot, capacity_factor)
            for rank, (peak, rows, dropped) in enumerate(results):
                print(f"{'one hot' if hot else 'balanced':<10}{capacity_factor or 'dropless':>10}{rank:>6}"
                      f"{peak:>10.0f}{rows:>18}{f'{dropped}/{assignments}':>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

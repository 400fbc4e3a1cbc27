"""Communication per MoE layer: bytes predicted by the cost model beside the bytes counted.

    python -m gatepro_dist.experiments.bench.comm [--ep 2] [--experts 16] [--hidden 512] [--top-k 2] [--tokens 8192]
                                                 [--dtype fp32|bf16]

Runs one forward+backward of the layer on ``ep`` gloo ranks while ``comm.count_traffic`` tallies
every collective's payload, and prints, per kind, the model's prediction (uniform routing, and
exact given the rows that crossed ranks) and the counted bytes for each rank. ``--dtype bf16`` runs the
layer under bf16 autocast, as ``train.dtype=bf16`` does: the tokens cross ranks in bf16.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ...cluster.spawn import run_on_ranks
from ...moe import comm
from ...moe.comm_model import ACTIVATION_BYTES, LayerComm
from ...moe.layer import MoELayer, MoESpec


def _measure(rank: int, world: int, args: dict) -> dict:
    group = dist.new_group(list(range(world)))
    spec = MoESpec(hidden_size=args["hidden"], num_experts=args["experts"], top_k=args["top_k"],
                   expert_ffn_dim=args["ffn"])
    layer = MoELayer(spec, group)
    x = torch.randn(args["tokens"], args["hidden"], generator=torch.Generator().manual_seed(rank))
    with comm.count_traffic() as traffic:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args["dtype"] == "bf16"):
            out, stats = layer(x.requires_grad_())
        (out.float().square().mean() + stats.loss).backward()
    model = LayerComm(args["experts"], args["hidden"], args["top_k"], world, args["tokens"],
                      activation_bytes=ACTIVATION_BYTES[args["dtype"]])
    return {"counted": dict(traffic), "uniform": model.bytes_by_kind(),
            "exact": model.bytes_by_kind(stats.rows_sent, stats.rows_received)}


def measure(ep: int, experts: int, hidden: int, top_k: int, tokens: int, ffn: int = 64,
            dtype: str = "fp32") -> list[dict]:
    args = dict(experts=experts, hidden=hidden, top_k=top_k, tokens=tokens, ffn=ffn, dtype=dtype)
    return run_on_ranks(ep, _measure, args)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dtype", choices=tuple(ACTIVATION_BYTES), default="fp32", help="as train.dtype")
    a = p.parse_args(argv)
    results = measure(a.ep, a.experts, a.hidden, a.top_k, a.tokens, dtype=a.dtype)
    print(f"MoE layer, one forward+backward: N={a.experts} d={a.hidden} k={a.top_k} "
          f"tokens/rank={a.tokens} ep={a.ep} {a.dtype} (gloo); bytes sent by each rank")
    print(f"{'rank':>4} {'kind':<20} {'model (uniform)':>16} {'model (exact)':>14} {'counted':>14} {'match':>6}")
    all_match = True
    for rank, r in enumerate(results):
        for kind in sorted(set(r["counted"]) | set(r["exact"])):
            exact, counted = r["exact"].get(kind, 0), r["counted"].get(kind, 0)
            all_match &= exact == counted
            print(f"{rank:>4} {kind:<20} {r['uniform'].get(kind, 0):>16,} {exact:>14,} {counted:>14,} "
                  f"{'yes' if exact == counted else 'NO':>6}")
    print(f"predicted_equals_counted={all_match}")
    return 0 if all_match else 1


if __name__ == "__main__":
    sys.exit(main())

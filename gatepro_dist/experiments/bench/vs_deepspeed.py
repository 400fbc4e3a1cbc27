"""Our MoE layer beside DeepSpeed-MoE: fwd+bwd of one layer at the same configuration.

    gatepro-bench layer --compare deepspeed [--tokens 8192 --hidden 512 --ffn 1024 --experts 16
                                             --top-k 2 --ep 1,2 --repeats 15 --quick]

Rows, for every ep (default 1 and 2), N=16 experts, SwiGLU of width ffn, top-2, fp32, CPU:

- ``ours plain top-k``: our ``MoELayer`` with GatePro off -- the like-for-like row;
- ``ours GatePro``: the same layer with GatePro on -- an extra row, the price of GatePro;
- ``DeepSpeed top-k``: ``deepspeed.moe.layer.MoE`` with its plain ``TopKGate``; its expert module
  is ``gatepro_dist.moe.experts.SwiGLU`` (bias-free gate, up and down projections: the FLOPs of ours).

Both layers hold the same weights (DeepSpeed's gate and experts are copied from ours) and see the
same tokens and upstream gradient; before timing, the run checks that their outputs agree.

Capacity. Ours is dropless (``capacity_factor=None``): each expert computes exactly the rows routed
to it. DeepSpeed runs with ``drop_tokens=False``, its dropless mode: ``capacity_factor`` and
``min_capacity`` are then unused and every expert's buffer is padded to the busiest expert's count C
(max over the EP group), so each rank's experts compute N x C rows where ours compute about
tokens x k; the report prints C. Its random token selection, Gumbel second-expert sampling and
noisy gating are off (``use_rts=False, top2_2nd_expert_sampling=False, noisy_gate_policy=None``),
so it routes exactly like our plain top-k.

Timing is the layer benchmark's (layer.py): each ep in freshly spawned processes (gloo) with the
same threads per rank, core pinning and allocator settings; the three rows and the FLOP floor are
timed in interleaved rounds whose order rotates every round; a step is forward + backward from a
barrier and counts as the slowest rank's time; figures are medians over the rounds. DeepSpeed needs
a process group even at ep=1, so both sides run inside a one-rank gloo group there (ours ignores it).

Peak memory. After the timed rounds come MEMORY_ROUNDS untimed rounds (order rotating again). Before
each step, free heap memory is handed back to the kernel (glibc ``malloc_trim``) and the peak-RSS
counter reset (``5`` written to ``/proc/self/clear_refs``); the step's figure is ``VmHWM`` after it
minus ``VmRSS`` before it (``/proc/self/status``): the resident memory the step added at its peak --
activations, gradients, dispatch buffers. Reported: the median over those rounds, the largest over
the ranks. Where the allocator places tensors moves a single reading by ~10-20%, hence the median.
``n/a`` where /proc or glibc does not allow it.

``speedup_vs_deepspeed`` (the last line printed): the geometric mean over the ep values of
(DeepSpeed's median step wall time / the median step wall time of ``ours plain top-k``), both from
the same run. Above 1, ours is faster.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import statistics

import torch
import torch.distributed as dist

from ...moe.experts import SwiGLU
from ...moe.layer import MoELayer, MoESpec
from .rounds import (COLUMNS_LINE, HEADER as LAYER_HEADER, BenchConfig, Variant, dense_gemm_step, floor_lines,
                     floor_name, format_row, join_ep, layer_step, paired_ratio, peak_memory_in_rounds, run_line,
                     slowest_rank, time_in_rounds)

OURS_PLAIN, OURS_GATEPRO, DEEPSPEED = "ours plain top-k", "ours GatePro", "DeepSpeed top-k"
ROWS = (OURS_PLAIN, OURS_GATEPRO, DEEPSPEED)
HEADER = LAYER_HEADER + f"{'peak MiB':>10}"
MEMORY_ROUNDS = 3
INSTALL_HINT = "install it with `GATEPRO_WITH=deepspeed bash launch/install.sh` (see docs/deepspeed.md)"
CAPACITY_LINE = ("capacity: ours dropless (capacity_factor=None, each expert computes exactly its routed rows); "
                 "DeepSpeed drop_tokens=False (dropless: capacity_factor and min_capacity unused, every expert "
                 "padded to the busiest expert's count C over the EP group), use_rts=False, "
                 "top2_2nd_expert_sampling=False, noisy_gate_policy=None")
PEAK_LINE = (f"peak MiB = resident memory an untimed step adds at its peak (VmHWM after - VmRSS before, "
             f"heap trimmed and peak reset first), median of {MEMORY_ROUNDS} rounds, largest rank")


def deepspeed_problem() -> str | None:
    """None when DeepSpeed's MoE imports; otherwise one line naming the problem and the fix."""
    os.environ["DS_ACCELERATOR"] = "cpu"  # the comparison runs on CPU; the spawned ranks inherit it
    try:
        import deepspeed.moe.layer  # noqa: F401
    except Exception as err:  # ImportError, or a broken install failing while it loads
        reason = (str(err).splitlines() or [""])[0]
        return f"--compare deepspeed needs DeepSpeed, which does not import ({type(err).__name__}: {reason}); {INSTALL_HINT}"
    return None


# ----------------------------------------------------------------------------- DeepSpeed's layer


def deepspeed_layer_like(ours: MoELayer, ep: int):
    """``deepspeed.moe.layer.MoE`` at our layer's configuration, holding our layer's weights."""
    from deepspeed.moe.layer import MoE

    spec = ours.spec
    d, f = spec.hidden_size, spec.expert_ffn_dim
    moe = MoE(hidden_size=d, expert=SwiGLU(d, f), num_experts=spec.num_experts, ep_size=ep, k=spec.top_k,
              drop_tokens=False, use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the groups it creates
        moe.set_deepspeed_parallelism()
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(ours.router.gathered_weight())
        # Local expert i is global expert rank * N/ep + i on both sides.
        for i, expert in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            gate_up_DF2, down_FD = ours.experts.gate_up_proj[i], ours.experts.down_proj[i]
            expert.gate_proj.weight.copy_(gate_up_DF2[:, :f].t())
            expert.up_proj.weight.copy_(gate_up_DF2[:, f:].t())
            expert.down_proj.weight.copy_(down_FD.t())
    return moe


def deepspeed_step(moe, x_TD: torch.Tensor, grad_TD: torch.Tensor):
    """What ``layer.layer_step`` does for ours: forward, backward of (output . gradient + l_aux)."""
    def step() -> None:
        moe.zero_grad(set_to_none=True)
        x_TD.grad = None
        out_TD, l_aux, _ = moe(x_TD)
        torch.autograd.backward([out_TD, l_aux], [grad_TD, torch.ones_like(l_aux)])
    return step


@torch.no_grad()
def output_difference(ours: MoELayer, moe, x_TD: torch.Tensor) -> tuple[float, float]:
    """(max |ours - DeepSpeed|, max |ours|) on this rank's tokens, our router with GatePro off."""
    ours.router.gatepro_enabled = False
    ours_TD, _ = ours(x_TD)
    theirs_TD, _, _ = moe(x_TD)
    return float((ours_TD - theirs_TD).abs().max()), float(ours_TD.abs().max())


# ----------------------------------------------------------------------------- what one rank runs


def rank_main(rank: int, ep: int, cfg: BenchConfig, init_file: str, result_file: str) -> None:
    os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    ep_group, barrier, threads = join_ep(rank, ep, cfg, init_file, process_group=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it reports building its shared-memory op
        deepspeed.init_distributed(dist_backend="gloo")

    n = cfg.experts[0]
    spec = MoESpec(hidden_size=cfg.hidden, num_experts=n, top_k=cfg.top_k, expert_ffn_dim=cfg.ffn,
                   normalize_topk=cfg.top_k > 1)  # DeepSpeed's top-1 weight is the full-softmax probability
    ours = MoELayer(spec, ep_group)
    moe = deepspeed_layer_like(ours, ep)
    gen = torch.Generator().manual_seed(1000 + rank)
    x_TD = torch.randn(cfg.tokens, cfg.hidden, generator=gen).requires_grad_()
    grad_TD = torch.randn(cfg.tokens, cfg.hidden, generator=gen)
    max_diff, out_scale = output_difference(ours, moe, x_TD)
    if not max_diff <= 1e-4 * max(out_scale, 1.0):
        raise RuntimeError(f"rank {rank}: our layer and DeepSpeed's disagree by {max_diff:.3g} on the same "
                           "weights and tokens; the comparison would not be like for like")

    steps = {
        floor_name(n): dense_gemm_step(cfg, n // ep, cfg.tokens * cfg.top_k * ep // n),
        OURS_PLAIN: layer_step(ours, Variant(n, gatepro=False, grouped=True), x_TD, grad_TD),
        OURS_GATEPRO: layer_step(ours, Variant(n, gatepro=True, grouped=True), x_TD, grad_TD),
        DEEPSPEED: deepspeed_step(moe, x_TD, grad_TD),
    }
    times = slowest_rank(time_in_rounds(steps, cfg.repeats, cfg.warmup, barrier), ep_group)
    mine = {"peak_bytes": peak_memory_in_rounds({row: steps[row] for row in ROWS}, MEMORY_ROUNDS, barrier),
            "busiest_expert": int(moe.deepspeed_moe.exp_counts.max()), "max_diff": max_diff, "out_scale": out_scale}
    every_rank = [mine]
    if ep_group is not None:
        every_rank = [None] * ep
        dist.all_gather_object(every_rank, mine, group=ep_group)
    dist.destroy_process_group()
    if rank == 0:
        peaks = {row: [r["peak_bytes"][row] for r in every_rank] for row in ROWS}
        with open(result_file, "w") as f:
            json.dump({
                "threads": threads, "times": times, "deepspeed": deepspeed.__version__,
                "peak_bytes": {row: None if None in p else max(p) for row, p in peaks.items()},
                "capacity": max(r["busiest_expert"] for r in every_rank),
                "max_diff": max(r["max_diff"] for r in every_rank),
                "out_scale": max(r["out_scale"] for r in every_rank),
            }, f)


# ----------------------------------------------------------------------------- the report


def speedup_vs_deepspeed(results: dict[int, dict]) -> float:
    """Geometric mean over ep of DeepSpeed's median wall time / our plain top-k median wall time."""
    ratios = [statistics.median(r["times"][DEEPSPEED]["wall"]) / statistics.median(r["times"][OURS_PLAIN]["wall"])
              for r in results.values()]
    return math.prod(ratios) ** (1 / len(ratios))


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def report(cfg: BenchConfig, results: dict[int, dict]) -> str:
    n, routed = cfg.experts[0], cfg.tokens * cfg.top_k
    version = next(iter(results.values()))["deepspeed"]
    lines = [run_line(cfg, f"MoE layer fwd+bwd, ours vs DeepSpeed-MoE {version}, N={n} SwiGLU experts (bias-free)"),
             CAPACITY_LINE, f"{COLUMNS_LINE}; {PEAK_LINE}", HEADER]
    for ep, result in results.items():
        times, floor = result["times"], result["times"][floor_name(n)]
        lines += [format_row(f"ep={ep} {row}", cfg.tokens * ep, times[row], floor)
                  + f"{_mib(result['peak_bytes'][row]):>10}" for row in ROWS]
    lines.append("")
    lines.append("Same weights and tokens, checked before timing: max |ours plain - DeepSpeed| = "
                 + ", ".join(f"{r['max_diff']:.1e} at ep={ep} (max |out| {r['out_scale']:.2f})"
                             for ep, r in results.items()))
    lines.append("DeepSpeed's dropless padding: each expert's buffer holds C rows, C = the busiest expert's count:")
    for ep, result in results.items():
        c = result["capacity"]
        lines.append(f"  ep={ep} C={c}: {n}x{c} = {n * c} expert rows per rank for {routed} routed "
                     f"({n * c / routed:.2f}x)")
    lines.append("DeepSpeed / ours plain top-k at the same ep (time: ratio of medians, and median of per-round "
                 "ratios; memory: ratio of peaks):")
    for ep, result in results.items():
        ds, ours = result["times"][DEEPSPEED], result["times"][OURS_PLAIN]
        peak_ds, peak_ours = result["peak_bytes"][DEEPSPEED], result["peak_bytes"][OURS_PLAIN]
        memory = f"{peak_ds / peak_ours:.2f}x" if peak_ds and peak_ours else "n/a"
        lines.append(f"  ep={ep}  wall {statistics.median(ds['wall']) / statistics.median(ours['wall']):.2f}x "
                     f"(per round {paired_ratio(ds['wall'], ours['wall']):.2f}x)  "
                     f"cpu {statistics.median(ds['cpu']) / statistics.median(ours['cpu']):.2f}x  peak memory {memory}")
    lines.extend(floor_lines(cfg, results))
    lines.append(f"speedup_vs_deepspeed: geometric mean over ep={','.join(map(str, results))} of DeepSpeed's median "
                 f"wall time / ours plain top-k median wall time (> 1: ours faster)")
    lines.append(f"speedup_vs_deepspeed={speedup_vs_deepspeed(results):.4f}")
    return "\n".join(lines)

"""Section ``timing``: CUDA-event times and peak memory of one MoE layer's fwd+bwd at several token counts.

Rows, per token count (all in bf16 compute, GatePro on where there is a router):

- ``dense bf16 matmul, same FLOPs``: the reference rate (fwd, dgrad, wgrad of [T·k, d] @ [d, 3·ffn]);
- ``grouped GEMMs alone``: our experts' SwiGLU (two ``grouped_mm`` and the activation) on rows already
  grouped, with the per-expert counts our router gives these tokens;
- ``ours, fp32 params + bf16 autocast``: the whole layer as ``train.dtype=bf16`` runs it;
- ``ours, bf16 expert params``: experts in bf16, router in fp32, bf16 tokens (``parallel.dp_shard``'s
  mixed precision);
- Megatron-core's ``MoELayer`` with our GatePro router, bf16 parameters, labelled with what its experts
  really are (``SequentialMLP, no Transformer Engine`` when Transformer Engine is not installed: a
  loop of dense MLPs, not a grouped GEMM). Only when megatron-core imports.

Each row: median and p10-p90 ms over ``repeats`` interleaved rounds after 5 warm-up rounds, TFLOP/s
of the experts' GEMM work, the dense row's median over its own ("vs dense"), and the peak memory of
one call measured on its own (``step_peak_mib``: above what was allocated before the call). Figures
are reported, not asserted; a variant that fails is a row with its error.
"""
from __future__ import annotations

import copy
import traceback

import torch

from ....moe.dispatch import count_per_expert
from ....moe.experts import swiglu_grouped
from ....moe.layer import MoELayer, MoESpec
from ..device_timing import step_peak_memory, summary, time_steps_ms
from ..gpu_report import dense_shapes, expert_gemm_flops, timing_row
from .world import cuda_device, world_of_one

DENSE = "dense bf16 matmul, same FLOPs"


def _backward_step(module, x, grad, autocast: bool):
    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out, stats = module(x)
        torch.autograd.backward([out, stats.loss], [grad.to(out.dtype), torch.ones_like(stats.loss)])
    return step


def variants(device, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, megatron: bool) -> tuple[dict, dict]:
    """name -> step (a fwd+bwd), and name -> error for the variants that could not be built."""
    gen = torch.Generator(device=device).manual_seed(0)
    x_TD = torch.randn(tokens, hidden, device=device, generator=gen).bfloat16().float()
    grad_TD = torch.randn(tokens, hidden, device=device, generator=gen)
    torch.manual_seed(0)
    ours = MoELayer(MoESpec(hidden_size=hidden, num_experts=experts, top_k=top_k, expert_ffn_dim=ffn)).to(device)
    ours_bf16 = copy.deepcopy(ours)
    ours_bf16.experts.to(torch.bfloat16)

    m, k, n = dense_shapes(tokens, top_k, hidden, ffn)
    a, w = (torch.randn(s, device=device, dtype=torch.bfloat16, generator=gen) for s in ((m, k), (k, n)))
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16, generator=gen)

    def dense_step():
        torch.mm(a, w), torch.mm(g, w.t()), torch.mm(a.t(), g)

    with torch.no_grad():
        counts_E = count_per_expert(ours.router(x_TD).experts_TK.flatten(), experts)
    rows_MD = torch.randn(tokens * top_k, hidden, device=device, dtype=torch.bfloat16, generator=gen).requires_grad_()
    gate_up = ours_bf16.experts.gate_up_proj.detach().clone().requires_grad_()
    down = ours_bf16.experts.down_proj.detach().clone().requires_grad_()
    grad_MD = torch.randn(tokens * top_k, hidden, device=device, dtype=torch.bfloat16, generator=gen)

    def grouped_step():
        rows_MD.grad = gate_up.grad = down.grad = None
        swiglu_grouped(rows_MD, gate_up, down, counts_E).backward(grad_MD)

    steps = {DENSE: dense_step, "grouped GEMMs alone (bf16)": grouped_step,
             "ours, fp32 params + bf16 autocast": _backward_step(ours, x_TD.clone().requires_grad_(), grad_TD, True),
             "ours, bf16 expert params": _backward_step(ours_bf16, x_TD.bfloat16().requires_grad_(), grad_TD, False)}
    failed = {}
    if megatron:
        from ....integrations.megatron_gpu_check import transformer_engine_version

        for use_te in (False, True) if transformer_engine_version() else (False,):
            name = f"Megatron-core MoELayer ({'TEGroupedMLP' if use_te else 'SequentialMLP'})"
            try:
                steps.update(_megatron_variant(device, tokens, hidden, ffn, experts, top_k, use_te, x_TD, grad_TD))
            except Exception as err:
                traceback.print_exc()
                failed[name] = f"{type(err).__name__}: {err}"
    return steps, failed


def _megatron_variant(device, tokens, hidden, ffn, experts, top_k, use_te, x_TD, grad_TD) -> dict:
    from ....integrations.megatron_gpu_check import experts_label, megatron_moe_layer

    layer = megatron_moe_layer(device, hidden, ffn, experts, top_k, torch.bfloat16, use_te=use_te,
                               aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    name = f"Megatron-core MoELayer ({experts_label(layer)}; bf16 params)"
    return {name: _megatron_step(layer, x_TD.view(tokens, 1, hidden).bfloat16().requires_grad_(),
                                 grad_TD.view(tokens, 1, hidden).bfloat16())}


def _megatron_step(layer, x_SBD, grad_SBD):
    def step():
        layer.zero_grad(set_to_none=True)
        x_SBD.grad = None
        out, _bias = layer(x_SBD)
        out.backward(grad_SBD)
    return step


def time_rows(device: torch.device, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, repeats: int,
              megatron: bool = False, warmup: int = 5) -> list[dict]:
    steps, failed = variants(device, tokens, hidden, ffn, experts, top_k, megatron)
    for name, step in list(steps.items()):  # one untimed call each: a variant that fails is a row, not a crash
        try:
            step()
        except Exception as err:
            traceback.print_exc()
            failed[name] = f"{type(err).__name__}: {err}"
            del steps[name]
    peaks = {name: step_peak_memory(step, device) for name, step in steps.items()}
    times = time_steps_ms(steps, repeats, warmup, device)
    flops = expert_gemm_flops(tokens, top_k, hidden, ffn)
    dense = summary(times[DENSE])["median_ms"] if DENSE in times else None
    rows = [{"tokens": tokens, **timing_row(name, summary(ms), flops, dense), **(peaks[name] or {})}
            for name, ms in times.items()]
    return rows + [{"tokens": tokens, "name": name, "error": error} for name, error in failed.items()]


def megatron_importable() -> str | None:
    try:
        import megatron.core  # noqa: F401
    except Exception as err:  # not installed, or it does not import on this machine
        return f"megatron-core is not importable ({type(err).__name__}): carry its wheel (docs/gpu_acceptance.md)"
    return None


def timing(options: dict, note) -> dict:
    device = cuda_device()
    sizes = {k: options[k] for k in ("hidden", "ffn", "experts", "top_k")}
    rows, missing = [], megatron_importable()

    def all_rows(megatron: bool):
        for tokens in options["tokens"]:
            rows.extend(time_rows(device, tokens, repeats=options["repeats"], megatron=megatron, **sizes))
            note("rows", rows)

    if missing:
        all_rows(False)
    else:  # Megatron's layer needs its parallel state, on a plain nccl group as Megatron launches it
        from megatron.core import parallel_state

        from ....integrations.megatron_gpu_check import init_model_parallel_of_one

        with world_of_one(device, backend="nccl"):
            init_model_parallel_of_one()
            try:
                all_rows(True)
            finally:
                parallel_state.destroy_model_parallel()
    return {"config": {**sizes, "tokens": options["tokens"], "repeats": options["repeats"]},
            "gflop_per_token_count": {t: expert_gemm_flops(t, sizes["top_k"], sizes["hidden"], sizes["ffn"]) / 1e9
                                      for t in options["tokens"]},
            "megatron": missing or "timed", "rows": rows, "passed": not any("error" in r for r in rows)}

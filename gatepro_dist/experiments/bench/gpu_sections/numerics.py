"""Section ``numerics``: our MoE layer in bf16 against fp32 (TF32 off), on the same weights and tokens.

Reference: fp32 parameters and operands, the per-expert loop, TF32 off for matmuls and cuDNN.
Compared, two ways of running bf16:

- ``autocast``: fp32 parameters under bf16 autocast on the grouped-GEMM path (``train.dtype=bf16``);
- ``bf16 params``: the experts' parameters in bf16 and bf16 tokens, the router in fp32 (as
  ``parallel.dp_shard``'s mixed precision runs it).

Both are compared on the output, the input gradient, the router's and the experts' weight gradients
(norm-wise relative error ``|a - b| / |b|``) and on the aux and z losses (relative). The router computes
its logits in fp32 in every run, so the routing is the same and the differences are the experts' GEMMs
in bf16; a change of routing is reported as a failure of its own.

Cases: ``uniform`` (2048 random tokens); ``skewed`` (1001 tokens leaning towards one direction that the
last quarter of the experts point away from: those experts get no token, the others per-expert counts
that are not multiples of 8, which the grouped GEMM's fast path must handle; their weight gradients
must be exactly zero, cf. pytorch/pytorch#172439); ``capacity`` (the skewed tokens with
``capacity_factor`` 1.0: the busy experts drop tokens, the same ones in every run).
"""
from __future__ import annotations

import copy

import torch

from ....moe.layer import MoELayer, MoESpec
from .world import cuda_device

CASES = {"uniform": (2048, False, None), "skewed": (1001, True, None), "capacity": (1001, True, 1.0)}
TOLERANCE = {"autocast": 2e-2, "bf16 params": 3e-2}  # bf16 keeps 8 significant bits (2^-9 ~ 2e-3 per rounding)
LOSS_TOLERANCE = 1e-5  # the losses come from the fp32 logits in every run


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_case(device, tokens: int, skewed: bool, capacity_factor, hidden: int, experts: int, ffn: int, top_k: int):
    """A layer and its tokens; skewed: every token leans towards u, the last quarter of the router rows
    strongly away from it (never chosen), the first two towards it (busy)."""
    torch.manual_seed(0)
    layer = MoELayer(MoESpec(hidden_size=hidden, num_experts=experts, top_k=top_k, expert_ffn_dim=ffn,
                             capacity_factor=capacity_factor)).to(device)
    gen = torch.Generator().manual_seed(1)
    x_TD = torch.randn(tokens, hidden, generator=gen)
    grad_TD = torch.randn(tokens, hidden, generator=gen)
    if skewed:
        u_D = torch.randn(hidden, generator=gen)
        u_D /= u_D.norm()
        x_TD += 4.0 * u_D
        lean_N = torch.zeros(experts)
        lean_N[:2], lean_N[experts - experts // 4:] = 0.5, -3.0
        with torch.no_grad():
            layer.router.weight += (lean_N[:, None] * u_D[None, :]).to(device)
    # bf16-representable tokens: every run, bf16 ones included, gives the router the same values.
    x_TD, grad_TD = x_TD.bfloat16().float(), grad_TD.bfloat16().float()
    return layer, x_TD.to(device), grad_TD.to(device)


def run_layer(layer: MoELayer, x_TD, grad_TD, mode: str) -> dict:
    """One fwd+bwd in ``mode`` ("fp32", "autocast", "bf16 params") on a copy of ``layer``; its outputs
    and gradients in fp32."""
    layer = copy.deepcopy(layer)
    layer.experts.grouped_gemm = mode != "fp32"
    dtype = torch.bfloat16 if mode == "bf16 params" else torch.float32
    layer.experts.to(dtype)
    x = x_TD.detach().to(dtype).clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=mode == "autocast"):
        out, stats = layer(x)
    torch.autograd.backward([out, stats.loss], [grad_TD.to(out.dtype), torch.ones_like(stats.loss)])
    result = {"output": out.detach().float(), "input_grad": x.grad.float(),
              "router_grad": layer.router.weight.grad.float(), "gate_up_grad": layer.experts.gate_up_proj.grad.float(),
              "down_grad": layer.experts.down_proj.grad.float(), "aux_loss": stats.aux_loss.detach().float(),
              "z_loss": stats.z_loss.detach().float(), "tokens_per_expert": stats.tokens_per_expert.clone(),
              "dropped": stats.dropped_tokens.clone()}
    return result


def compare_case(device: torch.device, tokens: int, skewed: bool, capacity_factor, hidden: int = 256,
                 experts: int = 16, ffn: int = 512, top_k: int = 2) -> dict:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        layer, x_TD, grad_TD = make_case(device, tokens, skewed, capacity_factor, hidden, experts, ffn, top_k)
        runs = {mode: run_layer(layer, x_TD, grad_TD, mode) for mode in ("fp32", "autocast", "bf16 params")}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    reference = runs["fp32"]
    counts = reference["tokens_per_expert"].tolist()
    empty = [e for e, c in enumerate(counts) if c == 0]
    result = {"tokens": tokens, "capacity_factor": capacity_factor, "tokens_per_expert": counts,
              "empty_experts": empty, "counts_not_multiple_of_8": sum(1 for c in counts if c % 8),
              "dropped": int(reference["dropped"]), "relative_errors": {}, "passed": True}
    for mode in ("autocast", "bf16 params"):
        run = runs[mode]
        errors = {key: _relative(run[key], reference[key])
                  for key in ("output", "input_grad", "router_grad", "gate_up_grad", "down_grad")}
        errors.update({key: float((run[key] - reference[key]).abs() / reference[key].abs().clamp_min(1e-30))
                       for key in ("aux_loss", "z_loss")})
        same_routing = bool(torch.equal(run["tokens_per_expert"], reference["tokens_per_expert"])
                            and int(run["dropped"]) == int(reference["dropped"]))
        empty_grads_zero = all(bool((run[g][empty] == 0).all()) for g in ("gate_up_grad", "down_grad"))
        result["relative_errors"][mode] = errors
        result[f"{mode}: same routing"] = same_routing
        result[f"{mode}: empty experts' gradients exactly 0"] = empty_grads_zero
        tensors_ok = max(v for k, v in errors.items() if not k.endswith("_loss")) < TOLERANCE[mode]
        losses_ok = max(errors["aux_loss"], errors["z_loss"]) < LOSS_TOLERANCE
        result["passed"] &= tensors_ok and losses_ok and same_routing and empty_grads_zero
    return result


def compare_all(device: torch.device, **sizes) -> dict:
    cases = {name: compare_case(device, tokens, skewed, capacity, **sizes)
             for name, (tokens, skewed, capacity) in CASES.items()}
    skew = cases["skewed"]
    shaped = bool(skew["empty_experts"]) and skew["counts_not_multiple_of_8"] > 0 and cases["capacity"]["dropped"] > 0
    return {"cases": cases, "tolerance": {**TOLERANCE, "losses": LOSS_TOLERANCE},
            "skew_and_drops_as_intended": shaped,
            "passed": shaped and all(c["passed"] for c in cases.values())}


def numerics(options: dict, note) -> dict:
    return compare_all(cuda_device())

"""Section ``sync_debug``: our MoE layer's forward and backward under
``torch.cuda.set_sync_debug_mode("error")``, where any operation that makes the host wait for the GPU
raises. DESIGN §5 counted, on the CPU, no host read for a layer at ep=1 without capacity and one with
capacity (the split sizes); this is the same question asked of CUDA itself, where copies and kernels
the CPU count cannot see (``bincount``, pageable host-to-device copies, C++ fallbacks) would show.

Cases, each after one untimed warm-up call outside the mode (cuBLAS handles and the allocator are set
up lazily, and that is not the layer's doing):

- ``dropless bf16`` (required to pass): bf16 autocast, grouped GEMM, no capacity.
- ``capacity bf16`` (reported): with ``capacity_factor`` 1.0 the split sizes are read once.
- ``fp32`` (reported): fp32 operands make ``_grouped_mm`` take its fallback, which copies the offsets
  to the host (DESIGN §5).

Each case records ``pass`` or the first error and the innermost frame of ours that raised it.
"""
from __future__ import annotations

import traceback

import torch

from ....moe.layer import MoELayer, MoESpec
from .world import cuda_device

CASES = {
    "dropless bf16": {"capacity_factor": None, "bf16": True, "required": True},
    "capacity bf16": {"capacity_factor": 1.0, "bf16": True, "required": False},
    "fp32": {"capacity_factor": None, "bf16": False, "required": False},
}


def _our_frame(err: BaseException) -> str | None:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "gatepro_dist/" in f.filename.replace("\\", "/")]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename.replace(chr(92), '/').rsplit('gatepro_dist/', 1)[1]}:{frame.lineno} in {frame.name}"


def layer_step(layer: MoELayer, x_TD: torch.Tensor, grad_TD: torch.Tensor, bf16: bool) -> None:
    x = x_TD.detach().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out, stats = layer(x)
    torch.autograd.backward([out, stats.loss], [grad_TD, torch.ones_like(stats.loss)])


def check_case(device: torch.device, capacity_factor: float | None, bf16: bool, tokens: int = 4096) -> dict:
    torch.manual_seed(0)
    spec = MoESpec(hidden_size=512, num_experts=16, top_k=2, expert_ffn_dim=1024, capacity_factor=capacity_factor)
    layer = MoELayer(spec).to(device)
    x_TD = torch.randn(tokens, 512, device=device)
    grad_TD = torch.randn(tokens, 512, device=device)
    layer_step(layer, x_TD, grad_TD, bf16)  # warm-up, outside the mode
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer_step(layer, x_TD, grad_TD, bf16)
        outcome = {"result": "pass"}
    except RuntimeError as err:
        outcome = {"result": "synchronised", "first_error": str(err).splitlines()[0][:300], "where": _our_frame(err)}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return outcome


def sync_debug(options: dict, note) -> dict:
    device = cuda_device()
    cases = {}
    for name, case in CASES.items():
        cases[name] = {**check_case(device, case["capacity_factor"], case["bf16"]), "required": case["required"]}
        note(name, cases[name])
    return {"cases": cases, "layer": "d=512, 16 experts, top-2, ffn 1024, 4096 tokens, ep=1",
            "passed": all(c["result"] == "pass" for c in cases.values() if c["required"])}

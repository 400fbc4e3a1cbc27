"""Where experts compute: SwiGLU experts over rows grouped by expert.

Two implementations of the same function: grouped GEMM (one kernel call per projection for all
local experts) and a per-expert loop, kept as the readable reference the tests compare against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .comm import local_tensor
from .router import mark_expert_parallel, seeded_rows

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_gemm_available() -> bool:
    return _grouped_mm is not None


# GPUs where torch's grouped_mm has its fused bf16 kernel (sm90: H100/H200, sm100: B200). Elsewhere
# (fp32 on any GPU, bf16 on A100, L40S, sm120, ...) torch runs ``_grouped_mm_fallback``, which
# copies the offsets to the host and loops over experts: 6 hidden host copies per layer forward
# and backward, invisible to a Python counter.
GROUPED_MM_FAST_CAPABILITIES = ((9, 0), (10, 0))


def expert_kernel(device: torch.device, dtype: torch.dtype, grouped_gemm: bool = True) -> str:
    """Which expert computation runs for rows of ``dtype`` on ``device``: ``"grouped_mm"`` or ``"loop"``.

    ``grouped_mm`` where it is one kernel without a host copy: on the CPU (any dtype) and on a
    GPU with the fast bf16 path. Otherwise the per-expert loop, which takes its split sizes from
    the layer's one host read (``DispatchPlan.rows_per_local_expert``) instead of torch's fallback
    making its own. A device this code does not know is treated like a GPU without the fast path
    unless the rows are bf16 (the fake accelerator of the tests; grouped_mm's meta kernel is bf16 only).
    """
    if not grouped_gemm or not grouped_gemm_available():
        return "loop"
    if device.type == "cpu":
        return "grouped_mm"
    if dtype != torch.bfloat16:
        return "loop"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) not in GROUPED_MM_FAST_CAPABILITIES:
        return "loop"
    return "grouped_mm"


def describe_expert_kernel(device: torch.device, dtype: torch.dtype, grouped_gemm: bool = True) -> str:
    """One line for the start-up log: which expert computation runs, and why."""
    kernel = expert_kernel(device, dtype, grouped_gemm)
    if kernel == "grouped_mm":
        return f"experts: grouped GEMM (torch grouped_mm, {dtype} on {device.type})"
    if not grouped_gemm:
        return "experts: per-expert loop (moe.grouped_gemm=false)"
    why = ("grouped_mm's fast path is bf16 on sm90/sm100 only; its fallback copies offsets to the host"
           if device.type == "cuda" else f"grouped_mm has no sync-free {dtype} kernel known on {device.type}")
    return f"experts: per-expert loop, split sizes from the layer's one host read ({why})"


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects non-contiguous incoming gradients (e.g. from .sum()).
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


class _SwiGLUActivation(torch.autograd.Function):
    """silu(gate) * up, from the fused [gate | up] projection h [M, 2F].

    Memory: only h is saved (silu(gate) is recomputed in backward), and the backward writes the
    gradient of h into h's own storage -- h feeds nothing else (the projection that made it saves
    its inputs, not its output), so the largest activation is not allocated twice. Autograd of
    ``chunk`` would also build the gradient from two halves with a concatenation; this writes one
    contiguous [M, 2F] tensor, the layout grouped_mm's backward needs. (Not for retain_graph: a
    second backward would read the overwritten h.)
    """

    @staticmethod
    def forward(ctx, h_MF2: torch.Tensor) -> torch.Tensor:
        gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
        ctx.save_for_backward(h_MF2)
        return F.silu(gate_MF) * up_MF

    @staticmethod
    def backward(ctx, grad_MF: torch.Tensor) -> torch.Tensor:
        (h_MF2,) = ctx.saved_tensors
        gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
        grad_silu_MF = grad_MF * up_MF  # d/d silu(gate); up is overwritten next
        torch.mul(grad_MF, F.silu(gate_MF), out=up_MF)  # d/d up
        torch.ops.aten.silu_backward(grad_silu_MF, gate_MF, grad_input=gate_MF)  # d/d gate, in place
        return h_MF2


def swiglu_grouped(x_MD, gate_up_EDF2, down_EFD, tokens_per_expert_E) -> torch.Tensor:
    offsets_E = torch.cumsum(tokens_per_expert_E, 0).to(torch.int32)
    h_MF2 = _grouped_mm(x_MD, gate_up_EDF2, offs=offsets_E)
    return _contiguous_grad(_grouped_mm(_SwiGLUActivation.apply(h_MF2), down_EFD, offs=offsets_E))


def swiglu_loop(x_MD, gate_up_EDF2, down_EFD, tokens_per_expert_E, rows_per_expert: list[int] | None = None) -> torch.Tensor:
    """``rows_per_expert``: the same counts on the host, when the caller has them (no read here)."""
    outputs = []
    if rows_per_expert is None:
        # A host read, inherent to a loop: only at ep=1 dropless, where the layer made none before.
        rows_per_expert = tokens_per_expert_E.tolist()
    # unbind, not indexing: the backward of weight[e] would add a full-size zero gradient per expert.
    experts = zip(torch.split(x_MD, rows_per_expert), gate_up_EDF2.unbind(0), down_EFD.unbind(0))
    for rows_MD, gate_up_DF2, down_FD in experts:
        gate_MF, up_MF = (rows_MD @ gate_up_DF2).chunk(2, dim=-1)
        outputs.append((F.silu(gate_MF) * up_MF) @ down_FD)
    return torch.cat(outputs) if outputs else x_MD.new_zeros((0, down_EFD.shape[-1]))


class GroupedExperts(nn.Module):
    """The local experts of one MoE layer. Parameters are indexed by local expert on dim 0.

    ``gate_up_proj`` [E, D, 2F] holds the gate projection in its first F columns and the up
    projection in the last F (one GEMM instead of two); ``down_proj`` is [E, F, D].
    """

    def __init__(self, num_local_experts: int, hidden_size: int, ffn_size: int,
                 first_expert: int = 0, grouped_gemm: bool = True):
        super().__init__()
        if grouped_gemm and not grouped_gemm_available():
            raise ValueError(
                "grouped_gemm=True needs torch.nn.functional.grouped_mm (torch >= 2.9); "
                "upgrade torch or set moe.grouped_gemm=false"
            )
        self.num_local_experts, self.hidden_size, self.ffn_size = num_local_experts, hidden_size, ffn_size
        self.first_expert, self.grouped_gemm = first_expert, grouped_gemm
        self.gate_up_proj = mark_expert_parallel(
            nn.Parameter(torch.empty(num_local_experts, hidden_size, 2 * ffn_size))
        )
        self.down_proj = mark_expert_parallel(
            nn.Parameter(torch.empty(num_local_experts, ffn_size, hidden_size))
        )
        self.reset_parameters(seed=0)

    def reset_parameters(self, seed: int) -> None:
        """Per-expert seeded init: expert e gets the same weights whatever the EP layout."""
        if self.gate_up_proj.is_meta:  # shapes only (gatepro-plan): nothing to draw
            return
        e, first, d, f = self.num_local_experts, self.first_expert, self.hidden_size, self.ffn_size
        with torch.no_grad():
            self.gate_up_proj.copy_(seeded_rows(e, first, (d, 2 * f), 1 / math.sqrt(d), 2 * seed + 1))
            self.down_proj.copy_(seeded_rows(e, first, (f, d), 1 / math.sqrt(f), 2 * seed + 2))

    def forward(self, x_MD: torch.Tensor, tokens_per_expert_E: torch.Tensor,
                rows_per_expert: list[int] | None = None) -> torch.Tensor:
        """``rows_per_expert``: ``tokens_per_expert_E`` on the host when the dispatch read it anyway."""
        gate_up, down = local_tensor(self.gate_up_proj).to(x_MD.dtype), local_tensor(self.down_proj).to(x_MD.dtype)
        if x_MD.shape[0] == 0:
            # Nothing arrived. Keep the input and the parameters in the autograd graph anyway:
            # every rank must run the same backward collectives (the all-to-all that brought
            # these zero rows), and parameter gradients should be 0, not None.
            return x_MD.new_zeros((0, self.hidden_size)) + 0 * (x_MD.sum() + gate_up.sum() + down.sum())
        if expert_kernel(x_MD.device, x_MD.dtype, self.grouped_gemm) == "grouped_mm":
            return swiglu_grouped(x_MD, gate_up, down, tokens_per_expert_E)
        return swiglu_loop(x_MD, gate_up, down, tokens_per_expert_E, rows_per_expert)


class SwiGLU(nn.Module):
    """A dense SwiGLU MLP (shared experts and the model's dense FFN layers)."""

    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=False)
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

"""How the device computes: TF32, deterministic kernels, and which AdamW implementation runs.

Called once by the trainer with the device it trains on, before the model is built; model code
never sets these global switches.
"""
from __future__ import annotations

import os

import torch

from ..config import TrainConfig
from ..config_checks import DETERMINISTIC_CUBLAS, check_cublas_workspace


def set_numerics(t: TrainConfig, device: torch.device, environ=os.environ) -> None:
    """TF32 for fp32 CUDA matmuls unless ``train.deterministic``; deterministic kernels when asked.

    On CUDA, ``train.deterministic`` needs CUBLAS_WORKSPACE_CONFIG before cuBLAS starts: it is set
    here when unset, and a value cuBLAS cannot be deterministic with is refused (``validate``
    refuses it first, before any process group exists).
    """
    if device.type == "cuda":
        if t.deterministic:
            environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS[0])
            check_cublas_workspace(True, environ)
        torch.backends.cuda.matmul.allow_tf32 = not t.deterministic
        torch.backends.cudnn.allow_tf32 = not t.deterministic
    if t.deterministic:
        torch.use_deterministic_algorithms(True)


def adamw_kind(device: torch.device) -> str:
    """The fastest AdamW update the device has: one fused kernel on CUDA, foreach elsewhere."""
    return "fused" if device.type == "cuda" else "foreach"


def adamw(params, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with ``adamw_kind``'s implementation and the configured betas and eps."""
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **{adamw_kind(device): True})


def describe_optimizer(t: TrainConfig, device: torch.device, backend: str = "native", zero_stage: int = 0) -> str:
    """One line for the start-up log: which optimizer runs, where, with which hyper-parameters."""
    kind = (f"torch AdamW (foreach) under DeepSpeed ZeRO-{zero_stage}" if backend == "deepspeed"
            else f"torch AdamW ({adamw_kind(device)})")
    return (f"optimizer: {kind}, lr {t.lr:g} ({t.lr_schedule}, warmup {t.warmup_steps}), betas "
            f"({t.beta1:g}, {t.beta2:g}), eps {t.eps:g}, weight decay {t.weight_decay:g}")

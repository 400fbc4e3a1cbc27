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


def adamw(params, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fastest update the device has: one fused kernel on CUDA, foreach elsewhere."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.beta1, t.beta2), **fast)

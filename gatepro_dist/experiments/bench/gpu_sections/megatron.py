"""Section ``megatron_check``: ``integrations/megatron_gpu_check.py``'s two checks in bf16 (Megatron's
``MoELayer`` with the GatePro router beside ours, same weights; a 2-layer Megatron GPT trained with
GatePro), on a plain ``nccl`` world of one as Megatron launches it. Skipped when megatron-core does not
import (the GPU machine has none unless its wheel is carried)."""
from __future__ import annotations

import torch

from .timing import megatron_importable
from .world import cuda_device, world_of_one


def megatron_check(options: dict, note) -> dict:
    device = cuda_device()
    missing = megatron_importable()
    if missing:
        return {"skipped": missing}
    from megatron.core import parallel_state

    from ....integrations.megatron_gpu_check import init_model_parallel_of_one, run_checks

    with world_of_one(device, backend="nccl"):
        init_model_parallel_of_one()
        try:
            return run_checks(device, torch.bfloat16, options["megatron_steps"])
        finally:
            parallel_state.destroy_model_parallel()

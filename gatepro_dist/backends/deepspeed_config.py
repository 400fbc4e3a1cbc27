"""The DeepSpeed config generated from ours, with a user JSON merged on top.

Pure data: no torch, no deepspeed, so ``config_checks.validate`` can check a user's JSON before any
process starts. Our YAML stays the one source of truth for everything that changes the numbers
our trainer computes (batch sizes, optimizer, LR schedule, precision, ZeRO stage); the user's JSON
may tune everything else (bucket sizes, communication dtype, logging...). A key that would
contradict our YAML is an error that names the YAML key to set instead.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

from ..config import Config, ConfigError

SUPPORTED_ZERO_STAGES = (0, 1, 2)
# DeepSpeed JSON key -> the key of ours that decides it (a user JSON must not set these differently)
OWNED_BY_OUR_CONFIG = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.global_batch_size / (world size * train.grad_accum)",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "bf16.enabled": "train.dtype",
    "torch_autocast.enabled": "train.dtype",
    "torch_autocast.dtype": "train.dtype",
    "torch_autocast.lower_precision_safe_modules": "train.dtype",
}
# Sections a user JSON may not contain at all: our trainer builds these itself.
REJECTED_SECTIONS = {
    "optimizer": "the optimizer is AdamW from train.lr/beta1/beta2/weight_decay",
    "scheduler": "the LR schedule is warmup + cosine from train.warmup_steps/min_lr_ratio",
    "fp16": "fp16 with loss scaling is not supported; use train.dtype=bf16",
}


def trainer_clips(cfg: Config) -> bool:
    """Whether our trainer clips gradients itself instead of DeepSpeed.

    At ZeRO stage 0, DeepSpeed clips with the *mean over ranks of each rank's local norm*
    (runtime/utils.py clip_grad_norm_), which under expert parallelism is not the model's norm:
    each EP rank holds different experts. There the gradients are still whole fp32 tensors on the
    module (bf16 runs under ``torch_autocast``: parameters stay fp32), so we clip them with the
    true global norm, exactly as the native trainer does. ZeRO 1/2 sum partition norms over all
    ranks, which is the true norm, so DeepSpeed clips there.
    """
    return cfg.deepspeed.zero_stage == 0


def mixed_precision(dtype: str) -> dict:
    """``train.dtype=bf16`` as the native trainer runs it: DeepSpeed's ``torch_autocast`` (fp32
    parameters, buffers and AdamW state; matmuls in bf16 under autocast), not its ``bf16`` section,
    which casts the whole module to bf16 -- the router rows (GatePro's comparison of fp32 logits)
    and the aux-loss-free ``expert_bias`` buffer with it (steps of 1e-3 vanish in bf16 once
    |bias| > 0.25). No module is declared "lower precision safe": gradients are reduced in fp32,
    as in the native trainer."""
    bf16 = dtype == "bf16"
    autocast = {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []} if bf16 else {"enabled": False}
    return {"bf16": {"enabled": False}, "torch_autocast": autocast}


def generated_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed config that runs the same optimisation as the native trainer."""
    t, stage = cfg.train, cfg.deepspeed.zero_stage
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size(world_size),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0 if trainer_clips(cfg) else t.grad_clip,
        "zero_optimization": {
            "stage": stage,
            # DeepSpeed's MoE support in ZeRO 1/2 requires both (asserted in stage_1_and_2.py).
            "reduce_scatter": True,
            "contiguous_gradients": True,
            "overlap_comm": False,
        },
        **mixed_precision(t.dtype),
        "zero_allow_untested_optimizer": True,  # our torch AdamW under ZeRO
        "steps_per_print": 2**31 - 1,  # our trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }


def read_user_config(path: str) -> dict:
    key = "deepspeed.config_path"
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path!r} does not exist; point it at a DeepSpeed JSON file or set it to null")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={path!r} is not valid JSON ({err}); fix the file or set {key}=null") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}={path!r} must hold a JSON object, got {type(data).__name__}; "
                          "write it as {\"key\": value, ...}")
    return data


def merge(base: dict, override: dict) -> dict:
    """A deep merge: mappings merge key by key, anything else in ``override`` replaces ``base``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _lookup(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return _MISSING
        d = d[part]
    return d


_MISSING = object()


def check_user_config(user: dict, generated: dict, path: str) -> None:
    for section, why in REJECTED_SECTIONS.items():
        if section in user and not (section == "fp16" and not _enabled(user[section])):
            raise ConfigError(f"deepspeed.config_path={path!r} sets '{section}', but {why}; "
                              f"remove '{section}' from the JSON")
    for dotted, ours in OWNED_BY_OUR_CONFIG.items():
        theirs = _lookup(user, dotted)
        if theirs is not _MISSING and theirs != _lookup(generated, dotted):
            raise ConfigError(f"deepspeed.config_path={path!r} sets {dotted}={json.dumps(theirs)} but our "
                              f"config gives {json.dumps(_lookup(generated, dotted))}; remove it from the "
                              f"JSON and set {ours} instead")


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def deepspeed_config(cfg: Config, world_size: int) -> dict:
    """Generated config, with ``deepspeed.config_path`` merged on top; raises ConfigError on conflicts."""
    stage = cfg.deepspeed.zero_stage
    if stage not in SUPPORTED_ZERO_STAGES:
        raise ConfigError(
            f"deepspeed.zero_stage={stage!r} is not supported; choose 0, 1 or 2 (ZeRO-3 partitions "
            "parameters, and our expert-parallel layer gathers its router rows itself)")
    generated = generated_config(cfg, world_size)
    if cfg.deepspeed.config_path is None:
        return generated
    user = read_user_config(cfg.deepspeed.config_path)
    check_user_config(user, generated, cfg.deepspeed.config_path)
    return merge(generated, user)

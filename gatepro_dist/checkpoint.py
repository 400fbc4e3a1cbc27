"""Resharding, atomic checkpoints with torch.distributed.checkpoint (DCP).

Experts, their router rows and their optimizer moments are saved as *global* tensors indexed by
global expert id (a DTensor sharded over the EP mesh dimension), so a run saved at one
(world size, ep) resumes at any other. Dense tensors are saved once.

Atomicity: DCP writes into ``step_XXXXXXXX.partial``; only after every rank finished does rank 0
add the manifest, rename the directory, and then replace the ``latest`` pointer. A process killed
mid-save leaves a ``.partial`` directory that is never read, and ``latest`` still names the
previous complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .parallel import ParallelGroups
from .router import is_expert_parallel

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
# Keys that fix tensor shapes: a checkpoint written with other values cannot be loaded.
SHAPE_KEYS = ("model.", "moe.num_experts", "moe.expert_ffn_dim", "moe.num_shared_experts",
              "moe.shared_expert_ffn_dim", "moe.shared_expert_gate")
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(ValueError):
    pass


def _barrier(groups: ParallelGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _global_view(tensor: torch.Tensor, expert: bool, groups: ParallelGroups):
    """Wrap an expert shard as a DTensor over the (edp, ep) mesh; other tensors stay as they are."""
    if not expert or groups.ep == 1:
        return tensor
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(tensor, groups.mesh, [Replicate(), Shard(0)], run_check=False)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups,
           materialize: bool) -> dict:
    """Model and optimizer state keyed by parameter name (the keys are layout independent)."""
    params = dict(model.named_parameters())
    state: dict = {}
    for name, tensor in model.state_dict().items():
        expert = name in params and is_expert_parallel(params[name])
        state[f"model.{name}"] = _global_view(tensor, expert, groups)
    for name, p in params.items():
        slot = optimizer.state.get(p)
        if not slot and materialize:  # a fresh optimizer: allocate what DCP will fill in
            slot = optimizer.state[p] = {
                "step": torch.zeros((), dtype=torch.float32),
                **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in MOMENTS},
            }
        if not slot:
            continue
        state[f"optim.{name}.step"] = slot["step"]
        for moment in MOMENTS:
            state[f"optim.{name}.{moment}"] = _global_view(slot[moment], is_expert_parallel(p), groups)
    return state


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, groups: ParallelGroups,
                    trainer_state: dict, config: dict, config_hash: str) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if groups.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(groups)
    with warnings.catch_warnings():  # DCP warns that one process without a process group is fine
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(_state(model, optimizer, groups, materialize=False), checkpoint_id=str(partial))
    _barrier(groups)
    if groups.is_main:
        manifest = {"format": 1, "step": step, "world_size": groups.world_size, "ep": groups.ep,
                    "dp": groups.dp, "config_hash": config_hash, "config": config}
        _write_json(partial / TRAINER_STATE, trainer_state)
        _write_json(partial / MANIFEST, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name)
    _barrier(groups)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if (path / MANIFEST).is_file() else None


def read_manifest(path: str | Path) -> dict:
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {MANIFEST}); point train.resume at a "
            f"directory under {CHECKPOINTS}/ or use train.resume=auto"
        )
    return json.loads(manifest.read_text())


def check_compatible(manifest: dict, config: dict, path: Path) -> list[str]:
    """Fail on a different model shape; return the other keys that changed (worth a note)."""
    saved, now = _flatten(manifest.get("config", {})), _flatten(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    for key in changed:
        if key.startswith(SHAPE_KEYS):
            raise CheckpointError(
                f"checkpoint {path} has {key}={saved.get(key)!r} but the config says "
                f"{now.get(key)!r}; resume with the checkpoint's model shape or start a new run_dir"
            )
    return changed


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, groups: ParallelGroups) -> dict:
    """Load model and optimizer state in place (any saved layout); return the trainer state."""
    path = Path(path)
    read_manifest(path)
    state = _state(model, optimizer, groups, materialize=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            loaded = state[f"model.{name}"]
            loaded = loaded.to_local() if hasattr(loaded, "to_local") else loaded
            if loaded.data_ptr() != tensor.data_ptr():
                tensor.copy_(loaded)
    del params
    return json.loads((path / TRAINER_STATE).read_text())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _write_json(path: Path, obj: dict) -> None:
    _write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

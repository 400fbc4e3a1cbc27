"""Resharding, atomic checkpoints with torch.distributed.checkpoint (DCP).

Experts, their router rows and their optimizer moments are saved as *global* tensors indexed by
global expert id (a DTensor sharded over the EP mesh dimension), so a run saved at one
(world size, ep) resumes at any other. Dense tensors are saved once.

Atomicity: DCP writes into ``step_XXXXXXXX.partial``; only after every rank finished does rank 0
add the manifest, rename the directory, and then replace the ``latest`` pointer. A process killed
mid-save leaves a ``.partial`` directory that is never read, and ``latest`` still names the
previous complete checkpoint.

A *weights-only* checkpoint (manifest ``kind: weights-only``, written by `save_weights_only`, e.g.
by ``gatepro-convert hf-to-gp``) holds model tensors and nothing else: resuming from it loads the
weights, starts a fresh optimizer and begins at step 0 with the sampler at its start.
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

from .config import Config
from .parallel import ParallelGroups, single_process_groups
from .router import is_expert_parallel

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
# Keys that fix tensor shapes: a checkpoint written with other values cannot be loaded.
SHAPE_KEYS = ("model.", "moe.num_experts", "moe.expert_ffn_dim", "moe.num_shared_experts",
              "moe.shared_expert_ffn_dim", "moe.shared_expert_gate")
MOMENTS = ("exp_avg", "exp_avg_sq")
FULL, WEIGHTS_ONLY = "full", "weights-only"


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
        if optimizer is None:  # model tensors only (a weights-only checkpoint)
            break
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
    manifest = {"format": 1, "kind": FULL, "step": step, "world_size": groups.world_size, "ep": groups.ep,
                "dp": groups.dp, "config_hash": config_hash, "config": config}
    return _save(run_dir, step, _state(model, optimizer, groups, materialize=False), groups, manifest,
                 trainer_state)


def save_weights_only(run_dir: str | Path, model_state: dict[str, torch.Tensor], config: dict,
                      config_hash: str, source: dict | None = None) -> Path:
    """Write a step-0 checkpoint of model tensors only, from one process.

    ``model_state`` is keyed like ``Transformer.state_dict()`` and holds *global* tensors (all
    experts), i.e. what an ep=1 model holds; it loads at any ep and world size. ``source`` (e.g.
    where the weights came from) is kept in the manifest.
    """
    manifest = {"format": 1, "kind": WEIGHTS_ONLY, "step": 0, "world_size": 1, "ep": 1, "dp": 1,
                "config_hash": config_hash, "config": config, "source": source or {}}
    state = {f"model.{name}": tensor for name, tensor in model_state.items()}
    return _save(run_dir, 0, state, single_process_groups(), manifest, None)


def _save(run_dir: str | Path, step: int, state: dict, groups: ParallelGroups, manifest: dict,
          trainer_state: dict | None) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if groups.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(groups)
    with warnings.catch_warnings():  # DCP warns that one process without a process group is fine
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, checkpoint_id=str(partial), no_dist=groups.world_size == 1)
    _barrier(groups)
    if groups.is_main:
        if trainer_state is not None:
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


def is_weights_only(manifest: dict) -> bool:
    return manifest.get("kind", FULL) == WEIGHTS_ONLY


def check_compatible(manifest: dict, config: dict, path: Path) -> list[str]:
    """Fail on a different model shape; return the other keys that changed (worth a note).

    A key the saved config lacks (added to the schema later) counts as its default value.
    """
    saved = {**_flatten(Config().to_dict()), **_flatten(manifest.get("config", {}))}
    now = _flatten(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    for key in changed:
        if key.startswith(SHAPE_KEYS):
            raise CheckpointError(
                f"checkpoint {path} has {key}={saved.get(key)!r} but the config says "
                f"{now.get(key)!r}; resume with the checkpoint's model shape or start a new run_dir"
            )
    return changed


def load_checkpoint(path: str | Path, model: nn.Module, optimizer, groups: ParallelGroups) -> dict:
    """Load model and optimizer state in place (any saved layout); return the trainer state.

    From a weights-only checkpoint only the model is loaded (the optimizer is left fresh) and the
    trainer state is ``{"step": 0, "weights_only": True}``.
    """
    path = Path(path)
    weights_only = is_weights_only(read_manifest(path))
    state = _state(model, None if weights_only else optimizer, groups, materialize=True)
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
    if weights_only:
        return {"step": 0, "weights_only": True}
    return json.loads((path / TRAINER_STATE).read_text())


def read_model_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint (any kind, any saved layout) as a full global tensor,
    keyed like ``Transformer.state_dict()``; one process, no model needed (used by exporters)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    read_manifest(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    state = {key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {key[len("model."):]: tensor for key, tensor in state.items()}


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

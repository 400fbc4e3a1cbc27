"""Resharding, atomic checkpoints with torch.distributed.checkpoint (DCP).

Experts, their router rows and their optimizer moments are saved as *global* tensors indexed by
global expert id (a DTensor sharded over the EP mesh dimension), so a run saved at one
(world size, ep) resumes at any other. Dense tensors are saved once.

Atomicity: DCP writes into ``step_XXXXXXXX.partial``; only after every rank finished does rank 0
add the manifest, rename the directory, and then replace the ``latest`` pointer. A process killed
mid-save leaves a ``.partial`` directory that is never read, and ``latest`` still names the
previous complete checkpoint. A save that fails (e.g. a full disk) fails on every rank together,
removes its ``.partial`` directory and raises `CheckpointSaveError`; the previous checkpoint stays.

Integrity: the manifest lists every file of the checkpoint with its size and SHA-256 (hashed by
all ranks, each a share of the files). Before loading, the files are checked the same way; a
missing, truncated or altered file is named in a `CheckpointError`, and ``resume=auto`` falls back
to the newest older checkpoint that is intact.

A *weights-only* checkpoint (manifest ``kind: weights-only``, written by `save_weights_only`, e.g.
by ``gatepro-convert hf-to-gp``) holds model tensors and nothing else: resuming from it loads the
weights, starts a fresh optimizer and begins at step 0 with the sampler at its start.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

from ..cluster import faults
from ..config import Config, config_from_dict, flatten_keys
from ..moe.comm import local_tensor
from ..moe.router import is_expert_parallel
from .optim import schedule_change_problem
from .parallel import ParallelGroups, single_process_groups

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
# Keys that fix tensor shapes: a checkpoint written with other values cannot be loaded.
SHAPE_KEYS = ("model.", "moe.num_experts", "moe.expert_ffn_dim", "moe.num_shared_experts",
              "moe.shared_expert_ffn_dim", "moe.shared_expert_gate")
MOMENTS = ("exp_avg", "exp_avg_sq")
FULL, WEIGHTS_ONLY = "full", "weights-only"
FORMAT = 2  # 2: the manifest lists every file with its size and SHA-256; 1: no checksums


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: incomplete, damaged, or of another model shape."""


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; it was abandoned everywhere and the previous checkpoint stays."""


def _barrier(groups: ParallelGroups) -> None:
    if groups.world_size > 1:
        dist.barrier()


def _global_view(tensor: torch.Tensor, expert: bool, groups: ParallelGroups):
    """Wrap an expert shard as a DTensor over the (edp, ep) mesh; other tensors stay as they are
    (under ``parallel.dp_shard`` every parameter already is a DTensor of its global shape)."""
    if not expert or groups.ep == 1 or groups.dp_shard:
        return tensor
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor.from_local(tensor, groups.mesh, [Replicate(), Shard(0)], run_check=False)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, groups: ParallelGroups,
           materialize: bool) -> dict:
    """Model and optimizer state keyed by parameter name (the keys are layout independent)."""
    # state_dict() first: its FSDP pre-hook reshards the root, which FSDP2 leaves unsharded after a
    # forward without backward (evaluation); only then are the parameters the optimizer's.
    model_state = model.state_dict()
    params = dict(model.named_parameters())
    state: dict = {}
    for name, tensor in model_state.items():
        expert = name in params and is_expert_parallel(params[name])
        state[f"model.{name}"] = _global_view(tensor, expert, groups)
    group_of = {id(q): group for group in optimizer.param_groups for q in group["params"]} if optimizer else {}
    for name, p in params.items():
        if optimizer is None:  # model tensors only (a weights-only checkpoint)
            break
        slot = optimizer.state.get(p)
        if not slot and materialize:  # a fresh optimizer: allocate what DCP will fill in
            slot = optimizer.state[p] = {
                "step": fresh_step_counter(p, group_of[id(p)]),
                **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in MOMENTS},
            }
        if not slot:
            continue
        state[f"optim.{name}.step"] = slot["step"]
        for moment in MOMENTS:
            state[f"optim.{name}.{moment}"] = _global_view(slot[moment], is_expert_parallel(p), groups)
    return state


def fresh_step_counter(param: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's ``step`` where torch itself would create it: on the parameter's device for the fused
    and capturable kernels (CUDA's fused AdamW reads it there without checking; a CPU counter is
    an illegal host-pointer read), in host memory otherwise (so its ``item()`` is no device sync).
    DCP loads into this tensor in place, so a resumed run keeps the placement."""
    on_device = group.get("fused") or group.get("capturable")
    return torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, optimizer, groups: ParallelGroups,
                    trainer_state: dict, config: dict, config_hash: str) -> Path:
    manifest = {"format": FORMAT, "kind": FULL, "step": step, "world_size": groups.world_size, "ep": groups.ep,
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
    manifest = {"format": FORMAT, "kind": WEIGHTS_ONLY, "step": 0, "world_size": 1, "ep": 1, "dp": 1,
                "config_hash": config_hash, "config": config, "source": source or {}}
    state = {f"model.{name}": tensor for name, tensor in model_state.items()}
    return _save(run_dir, 0, state, single_process_groups(), manifest, None)


def _save(run_dir: str | Path, step: int, state: dict, groups: ParallelGroups, manifest: dict,
          trainer_state: dict | None) -> Path:
    root = Path(run_dir) / CHECKPOINTS
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    previous = latest_checkpoint(run_dir)
    error = None
    if groups.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        error = _attempt(lambda: partial.mkdir(parents=True))
    error = agree_on_error(error, groups)
    if error is None:
        try:
            with warnings.catch_warnings():  # DCP warns that one process without a group is fine
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                dcp.save(state, checkpoint_id=str(partial), no_dist=groups.world_size == 1)
        except (Exception, CheckpointException) as err:  # DCP raises the same failure on every rank
            error = _reason(err, root, _nbytes(state))
        faults.point("checkpoint")
        if error is None and groups.is_main and trainer_state is not None:
            error = _attempt(lambda: _write_json(partial / TRAINER_STATE, trainer_state))
        error = agree_on_error(error, groups)
    if error is None:
        manifest = {**manifest, "files": file_checksums(partial, groups)}
        if groups.is_main:
            error = _attempt(lambda: _publish(partial, final, manifest))
        error = agree_on_error(error, groups)
    if error is not None:
        if groups.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        _barrier(groups)
        raise CheckpointSaveError(
            f"saving checkpoint {final} failed: {error}; the previous checkpoint "
            f"{previous or '(none)'} is intact; free space or fix {root}, then rerun with train.resume=auto")
    return final


def _publish(partial: Path, final: Path, manifest: dict) -> None:
    """Rank 0, after every file is written: manifest, rename, then move the `latest` pointer."""
    _write_json(partial / MANIFEST, manifest)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(final.parent)
    _write_text_atomic(final.parent / LATEST, final.name)


def _attempt(action) -> str | None:
    try:
        action()
    except OSError as err:
        return _reason(err)
    return None


def _nbytes(state: dict) -> int:
    local = (v.to_local() if hasattr(v, "to_local") else v for v in state.values())
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor))


def _reason(err: BaseException, root: Path | None = None, needed: int = 0) -> str:
    """One line for a failed save: the first OS error inside, else a full disk if the filesystem
    has less room than this rank's share (DCP passes other ranks' errors pickled, which drops
    the OS error they wrap), else the first failure's message."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return f"{e.strerror or e} ({e.filename})" if e.filename else str(e.strerror or e)
        if isinstance(e, CheckpointException):  # rank -> (exception, traceback)
            stack += [failure[0] for failure in e.failures.values()]
        stack += [e.__cause__, e.__context__]
    if root is not None and shutil.disk_usage(root).free < needed:
        return (f"No space left on device ({shutil.disk_usage(root).free} bytes free on the filesystem of "
                f"{root}, this rank's share of the checkpoint is {needed} bytes)")
    first = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) else err
    return f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"


def agree_on_error(error: str | None, groups: ParallelGroups) -> str | None:
    """Every rank's view of a step that may fail on some ranks only: the first error, or None."""
    if groups.world_size == 1:
        return error
    errors: list = [None] * groups.world_size
    dist.all_gather_object(errors, error)
    return next((e if r == groups.rank else f"{e} (on rank {r})" for r, e in enumerate(errors) if e), None)


# ---- integrity ------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gather_dicts(mine: dict, groups: ParallelGroups) -> dict:
    if groups.world_size == 1:
        return mine
    parts: list = [None] * groups.world_size
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def file_checksums(directory: Path, groups: ParallelGroups) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under `directory` except the manifest;
    each rank hashes a share of the files (collective)."""
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                   if p.is_file() and p.name != MANIFEST)
    mine = {name: {"bytes": (directory / name).stat().st_size, "sha256": _sha256(directory / name)}
            for name in names[groups.rank::groups.world_size]}
    return _gather_dicts(mine, groups)


def find_damage(path: str | Path, groups: ParallelGroups) -> str | None:
    """What is wrong with a complete checkpoint's files (first problem, named), or None if every
    file matches the manifest. Format-1 checkpoints have no checksums and pass. Collective."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text()).get("files")
    except (ValueError, OSError, AttributeError) as err:
        return f"{path / MANIFEST} cannot be read ({type(err).__name__})"
    if files is None:
        return None
    names = sorted(files)
    mine = {}
    for name in names[groups.rank::groups.world_size]:
        expected, file = files[name], path / name
        if not file.is_file():
            mine[name] = "is missing"
        elif file.stat().st_size != expected["bytes"]:
            mine[name] = f"has {file.stat().st_size} bytes, the manifest says {expected['bytes']} (truncated?)"
        elif _sha256(file) != expected["sha256"]:
            mine[name] = "does not match its SHA-256 in the manifest (corrupted)"
    problems = _gather_dicts(mine, groups)
    first = min(problems, default=None)
    return None if first is None else f"{path / first} {problems[first]}"


def resolve_resume(run_dir: str | Path, resume: str, groups: ParallelGroups, log=print) -> Path | None:
    """The checkpoint to start from: None for ``resume=none`` or an empty run_dir.

    ``auto``: the `latest` checkpoint, or if its files are damaged the newest older one that is
    intact (each skipped one is logged). An explicit path must be intact. Collective.
    """
    if resume == "none":
        return None
    if resume != "auto":
        damage = find_damage(resume, groups)
        if damage:
            raise CheckpointError(f"{damage}; resume from another checkpoint "
                                  "(train.resume=auto falls back to the newest intact one)")
        return Path(resume)
    skipped = []
    for candidate in _newest_first(run_dir):
        damage = find_damage(candidate, groups)
        if damage is None:
            return candidate
        if groups.is_main:
            log(f"checkpoint damaged: {damage}; falling back to the previous complete checkpoint")
        skipped.append(candidate.name)
    if skipped:
        raise CheckpointError(f"every checkpoint in {Path(run_dir) / CHECKPOINTS} is damaged "
                              f"({', '.join(skipped)}); restore one, or start over in a new train.run_dir")
    return None


def _newest_first(run_dir: str | Path) -> list[Path]:
    """`latest`, then the complete checkpoints older than it, newest first."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return []
    older = [p for p in latest.parent.glob("step_*") if re.fullmatch(r"step_\d{8}", p.name)
             and (p / MANIFEST).is_file() and p.name < latest.name]
    return [latest, *sorted(older, reverse=True)]


def prune_checkpoints(run_dir: str | Path, keep_last: int | None, protected: Path | None = None) -> list[Path]:
    """``train.keep_last``: after a save, delete the complete checkpoints older than the newest
    ``keep_last``; never ``latest`` (the newest, just checksummed) nor ``protected`` (the one this
    run resumed from, until the run has moved past it). Rank 0 only. A checkpoint is first renamed
    out of the ``step_XXXXXXXX`` namespace, then removed, so a kill in between leaves nothing that
    ``resume=auto`` would try. Returns the deleted paths."""
    if keep_last is None:
        return []
    ordered = _newest_first(run_dir)
    spared = set(ordered[:max(keep_last, 1)])
    if protected is not None:
        spared.add(Path(protected))
    deleted = []
    for path in ordered:
        if path in spared:
            continue
        doomed = path.with_name(path.name + ".pruned")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    for leftover in Path(run_dir, CHECKPOINTS).glob("step_*.pruned"):  # from a kill mid-prune
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted


def preflight_resume(run_dir: str | Path, resume: str, config: dict) -> None:
    """Checks one process can make before any process group exists (raises CheckpointError):
    the checkpoint to resume is complete and has the configured model shape, and a new run
    (``resume=none``) would not overwrite an existing one."""
    run_dir = Path(run_dir)
    if resume == "none":
        if latest_checkpoint(run_dir) is not None or (run_dir / "metrics.jsonl").exists():
            raise CheckpointError(
                f"train.run_dir={run_dir} already holds a run; continue it with train.resume=auto, "
                "or choose a new train.run_dir (nothing was changed)")
        return
    if resume != "auto":
        check_compatible(read_manifest(resume), config, Path(resume))
        return
    latest = latest_checkpoint(run_dir)
    try:
        manifest = read_manifest(latest) if latest is not None else None
    except CheckpointError:  # damaged: the trainer falls back to an older checkpoint
        return
    if manifest is not None:
        check_compatible(manifest, config, latest)


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
    try:
        return json.loads(manifest.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"{manifest} cannot be read ({err}); the checkpoint is damaged: resume from "
                              "another one (train.resume=auto falls back to the newest intact one)") from None


def is_weights_only(manifest: dict) -> bool:
    return manifest.get("kind", FULL) == WEIGHTS_ONLY


def check_compatible(manifest: dict, config: dict, path: Path) -> list[str]:
    """Fail on a different model shape; return the other keys that changed (worth a note).

    A key the saved config lacks (added to the schema later) counts as its default value.
    """
    saved = {**flatten_keys(Config().to_dict()), **flatten_keys(manifest.get("config", {}))}
    now = flatten_keys(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    for key in changed:
        if key.startswith(SHAPE_KEYS):
            raise CheckpointError(
                f"checkpoint {path} has {key}={saved.get(key)!r} but the config says "
                f"{now.get(key)!r}; resume with the checkpoint's model shape or start a new run_dir"
            )
    if "train.steps" in changed and not is_weights_only(manifest):
        problem = schedule_change_problem(config_from_dict(manifest.get("config", {}), str(path)).train,
                                          config_from_dict(config).train, int(manifest.get("step", 0)))
        if problem is not None:
            raise CheckpointError(f"resuming {path}: {problem}")
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
            loaded, target = local_tensor(state[f"model.{name}"]), local_tensor(tensor)
            if loaded.data_ptr() != target.data_ptr():
                target.copy_(loaded)
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

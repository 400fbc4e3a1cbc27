"""Our model on a DeepSpeed engine: expert parameters, process groups and checkpoints.

How DeepSpeed 0.19.x treats MoE (read from its source, runtime/engine.py and zero/stage_1_and_2.py):

* A parameter is an *expert* parameter when ``param.allreduce is False``; ``param.group_name``
  names its expert group, which must be spelled ``ep_size_<N>`` (``_get_max_expert_size`` parses
  the number out of the name).
* The engine only turns its MoE machinery on (``has_moe_layers``) when the module tree contains a
  ``deepspeed.moe.layer.MoE``. Without it, expert gradients would be averaged over the whole
  world -- mixing different experts' gradients across EP ranks.
* With it on: stage 0 sums expert gradients over the expert-data-parallel (EDP) group of their
  ``group_name`` and divides by the *world* size (``_reduce_expert_gradients``); ZeRO 1/2 divide
  every gradient by the world size and reduce expert ones over the EDP group only
  (``average_tensor``), and partition expert optimizer groups (``'moe': True``, ``'name'`` =
  group name) over EDP. Both are exactly what our native ``reduce_gradients`` does.

So we (1) mark every expert-parallel parameter (experts and their router rows) as DeepSpeed
expert parameters, (2) put *our* EP and EDP process groups into DeepSpeed's group registry under
``ep_size_<ep>`` so the engine reduces over the very groups our layers communicate on, and (3) add
one parameter-free ``MoE`` subclass to the module tree that switches the machinery on. Our layers
keep their own router, dispatch and experts; DeepSpeed never runs its gate.

Checkpoints: DeepSpeed's per-expert checkpoint files assume its ``deepspeed_moe.experts`` naming,
which our grouped experts do not have, and its model file is written by rank 0 only. So the marker
declares no local experts (DeepSpeed writes no expert files) and each EP rank's EDP-rank-0 writes
its expert-parallel tensors beside DeepSpeed's files; resume loads them after DeepSpeed's own load.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..moe.router import is_expert_parallel
from ..train.checkpoint import (CHECKPOINTS, FORMAT, LATEST, MANIFEST, TRAINER_STATE, CheckpointError, _write_json,
                          _write_text_atomic, file_checksums, read_manifest)
from ..train.optim import param_groups
from ..train.parallel import ParallelGroups, build_parallel_groups
from .deepspeed_config import deepspeed_config

SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))  # [low, high): the engine internals above were read at 0.19.8
EXPERT_FILE = "gatepro_expert_parallel_ep{ep_rank:03d}.pt"


def import_deepspeed(device: torch.device):
    """Import deepspeed for ``device`` and check its version against what this module was built on."""
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import time; on a GPU machine training on CPU it
        # would otherwise pick CUDA. An explicit choice by the user wins.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
        # deepspeed.initialize asserts it can read the local rank (torchrun and mpirun set it);
        # it only uses it to pick the device, which we have already picked.
        os.environ["LOCAL_RANK"] = str(device.index or 0)
    try:
        import deepspeed
    except ImportError as err:
        raise RuntimeError(
            "train.backend=deepspeed needs DeepSpeed: install it after torch with "
            "`DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19,<0.20'` "
            "(or run launch/install.sh)") from err
    version = tuple(int(x) for x in deepspeed.__version__.split("+")[0].split(".")[:2])
    low, high = SUPPORTED_DEEPSPEED
    if not low <= version < high:
        raise RuntimeError(
            f"DeepSpeed {deepspeed.__version__} is not supported by the deepspeed backend "
            f"(tested: 0.19.x); install 'deepspeed>=0.19,<0.20'")
    return deepspeed


def expert_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def ensure_process_group(groups: ParallelGroups, cfg: Config, device: torch.device) -> ParallelGroups:
    """DeepSpeed needs torch.distributed even for one process: start a one-rank group if needed."""
    if dist.is_initialized():
        return groups
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)
    return build_parallel_groups(cfg.parallel.ep, device.type)


def register_expert_groups(groups: ParallelGroups) -> str:
    """Put our EP and EDP groups into DeepSpeed's registry, so it reduces over exactly these."""
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups.ep)
    ep_group, edp_group = groups.mesh.get_group("ep"), groups.mesh.get_group("edp")
    for registry, ranks, group in (
        (ds_groups._EXPERT_PARALLEL_GROUP, ds_groups._EXPERT_PARALLEL_GROUP_RANKS, ep_group),
        (ds_groups._EXPERT_DATA_PARALLEL_GROUP, ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS, edp_group),
    ):
        registry[name] = group
        ranks[name] = dist.get_process_group_ranks(group)
    return name


def mark_expert_params(model: nn.Module, group_name: str) -> int:
    """Tag expert-parallel parameters (experts and router rows) the way DeepSpeed recognises them."""
    count = 0
    for p in model.parameters():
        if is_expert_parallel(p):
            p.allreduce, p.group_name = False, group_name
            count += 1
    return count


@functools.cache
def _expert_group_declaration_class():
    from deepspeed.moe.layer import MoE

    class ExpertGroupDeclaration(MoE):
        """Parameter-free: tells the engine the model has expert parameters in ``group_name``.

        ``MoE.__init__`` is skipped on purpose: it would build DeepSpeed's own gate and experts.
        ``num_local_experts = 0``: DeepSpeed writes and reads no per-expert checkpoint files.
        """

        def __init__(self, groups: ParallelGroups, num_experts: int):
            nn.Module.__init__(self)
            self.ep_size, self.num_experts, self.num_local_experts = groups.ep, num_experts, 0
            self.expert_group_name = expert_group_name(groups.ep)
            self.enable_expert_tensor_parallelism = False
            self._groups = groups

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            register_expert_groups(self._groups)  # the engine calls this while it builds itself

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertGroupDeclaration only declares expert groups; it is never called")

    return ExpertGroupDeclaration


class DeepSpeedModel(nn.Module):
    """What the engine wraps: our Transformer plus the expert-group declaration."""

    def __init__(self, model: nn.Module, groups: ParallelGroups, num_experts: int):
        super().__init__()
        self.model = model
        self.expert_groups = _expert_group_declaration_class()(groups, num_experts)

    def forward(self, tokens_BS: torch.Tensor):
        return self.model(tokens_BS)


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Our AdamW groups, with expert parameters moved into DeepSpeed's MoE groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    groups = split_params_into_different_moe_groups_for_optimizer(param_groups(model, weight_decay))
    return [g for g in groups if g["params"]]


def build_engine(deepspeed, cfg: Config, groups: ParallelGroups, model: nn.Module):
    """``deepspeed.initialize`` on our model with our groups, optimizer and generated config."""
    t = cfg.train
    mark_expert_params(model, register_expert_groups(groups))
    wrapped = DeepSpeedModel(model, groups, cfg.moe.num_experts)
    # foreach: one multi-tensor update per group, not a loop over parameters (DeepSpeed's ZeRO wrapper
    # steps this optimizer on its own partitions, so the fused CUDA kernel is not assumed here).
    optimizer = torch.optim.AdamW(optimizer_groups(model, t.weight_decay), lr=t.lr,
                                  betas=(t.beta1, t.beta2), eps=t.eps, foreach=True)
    engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer,
                                           config=deepspeed_config(cfg, groups.world_size))
    return engine


# ---- checkpoints ---------------------------------------------------------------------------

def expert_parallel_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if is_expert_parallel(p)}


def save_deepspeed_checkpoint(engine, model: nn.Module, run_dir: Path, step: int, groups: ParallelGroups,
                              trainer_state: dict, config: dict, config_hash: str) -> Path:
    """DeepSpeed's checkpoint of step ``step``, plus our expert shards and the manifest.

    ``latest`` moves only after every file is written, so a crash mid-save resumes from the
    previous checkpoint (``latest_checkpoint`` also ignores directories without a manifest).
    """
    root = Path(run_dir) / CHECKPOINTS
    tag = f"step_{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    if groups.dp_rank == 0:  # one writer per EP rank: EDP replicas hold identical experts
        torch.save(expert_parallel_state(model), root / tag / EXPERT_FILE.format(ep_rank=groups.ep_rank))
    if groups.is_main:
        _write_json(root / tag / TRAINER_STATE, trainer_state)
    dist.barrier()
    files = file_checksums(root / tag, groups)  # every rank hashes a share
    if groups.is_main:
        manifest = {"format": FORMAT, "backend": "deepspeed", "step": step, "world_size": groups.world_size,
                    "ep": groups.ep, "dp": groups.dp, "config_hash": config_hash, "config": config,
                    "files": files}
        _write_json(root / tag / MANIFEST, manifest)
        _write_text_atomic(root / LATEST, tag)
    dist.barrier()
    return root / tag


def load_deepspeed_checkpoint(engine, model: nn.Module, path: Path, groups: ParallelGroups,
                              config: dict) -> dict:
    """Restore engine, optimizer and experts from ``path``; return our trainer state."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("backend") != "deepspeed":
        raise CheckpointError(
            f"{path} was written by the native backend; DeepSpeed cannot read it. Resume it with "
            "train.backend=native, or start a new run_dir with train.backend=deepspeed")
    saved = (manifest["world_size"], manifest["ep"], manifest["config"].get("deepspeed", {}).get("zero_stage"),
             manifest["config"]["train"]["dtype"])
    now = (groups.world_size, groups.ep, config["deepspeed"]["zero_stage"], config["train"]["dtype"])
    if saved != now:
        raise CheckpointError(
            f"{path} holds (world_size, ep, deepspeed.zero_stage, train.dtype)={saved} but this run has "
            f"{now}; DeepSpeed checkpoints resume only at the same layout, stage and precision")
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {path}; is the directory complete?")
    experts = torch.load(path / EXPERT_FILE.format(ep_rank=groups.ep_rank), map_location="cpu")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in experts.items():
            params[name].copy_(tensor)
    return json.loads((path / TRAINER_STATE).read_text())

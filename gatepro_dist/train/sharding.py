"""``parallel.dp_shard``: parameters, gradients and AdamW state sharded with FSDP2 instead of replicated.

Dense parameters (attention, norms, embeddings, dense and shared-expert FFNs) are sharded over
every rank of the world; experts and their router rows, already split over the EP group, are
sharded again over their expert-data-parallel (EDP) group. Each rank then holds 1/world of the
dense state and 1/world of the expert state (each expert on 1/edp of the ranks that own it).

How the pieces fit (torchtitan composes FSDP2 with expert parallelism the same way):

- Expert parameters and router rows become DTensors sharded on the ``ep`` dimension of the
  (edp, ep) mesh before ``fully_shard`` takes the ``edp`` dimension, so FSDP builds 2-D
  placements and a checkpoint names each expert by its global index. Kept as plain local
  tensors, every EP rank would hold a tensor of the same name and shape, and DCP would keep one
  of them: after a reload some ranks would silently compute with other ranks' experts. The MoE
  code computes on ``comm.local_tensor`` of them, this rank's [E_local, ...] rows, as before.
- Gradient averaging matches the replicated engine: FSDP divides dense gradients by the world
  size; expert gradients, which already sum every EP rank's tokens through the all-to-all, are
  summed over EDP and divided by the world size too (``set_gradient_divide_factor``). gloo has
  no pre-scaled sum, so there the division follows a plain sum (``set_force_sum_reduction_for_comms``).
- ``train.dtype=bf16`` gathers and computes with bf16 parameters and keeps fp32 master weights,
  fp32 gradient reductions and fp32 AdamW state (``MixedPrecisionPolicy``). The router keeps fp32
  parameters: GatePro's penalty of 1e-4 must survive in its logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from ..moe import comm
from ..moe.layer import MoELayer
from ..moe.router import Routing, is_expert_parallel, mark_expert_parallel
from .parallel import ParallelGroups


def shard_model(model: nn.Module, cfg: Config, groups: ParallelGroups) -> nn.Module:
    """Apply FSDP2 to ``model`` in place: each MoE layer's experts and router (EDP mesh), each
    block (world mesh), then the root (embedding, final norm, output head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = groups.mesh
    world_mesh, edp_mesh = mesh._flatten("world"), mesh["edp"]
    compute = torch.bfloat16 if cfg.train.dtype == "bf16" else None
    # Activations keep the dtype autocast gives them, as in the replicated engine (the residual
    # stream and the RoPE tables stay fp32); FSDP only gathers and computes with bf16 weights.
    dense_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32, cast_forward_inputs=False)
    fp32_policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    force_sum = dist.get_backend() == "gloo"  # no PREMUL_SUM on gloo
    _let_fsdp_find_routing_tensors()

    expert_names = {name for name, p in model.named_parameters() if is_expert_parallel(p)}
    _distribute_expert_parameters(model, mesh["ep"])
    for block in model.layers:
        if isinstance(block.ffn, MoELayer):
            for part, policy in ((block.ffn.experts, dense_policy), (block.ffn.router, fp32_policy)):
                fully_shard(part, mesh=edp_mesh, mp_policy=policy,
                            shard_placement_fn=least_padding_placement(edp_mesh.size()))
                part.set_gradient_divide_factor(float(groups.world_size))
                # Only where a reduce-scatter runs: over one EDP rank FSDP copies the gradient
                # and divides it itself, and with forced sums it divides a second time (torch 2.13).
                part.set_force_sum_reduction_for_comms(force_sum and groups.dp > 1)
        fully_shard(block, mesh=world_mesh, mp_policy=dense_policy,
                    shard_placement_fn=least_padding_placement(world_mesh.size()))
    fully_shard(model, mesh=world_mesh, mp_policy=dense_policy,
                shard_placement_fn=least_padding_placement(world_mesh.size()))
    for name, param in model.named_parameters():  # fully_shard made new Parameter objects
        if name in expert_names:
            mark_expert_parallel(param)
    return model


def _let_fsdp_find_routing_tensors() -> None:
    """Make the router's output, a ``Routing`` dataclass, a pytree node.

    FSDP2 gathers a resharded module's parameters again for backward in a hook on the gradients
    of the module's output tensors. torch 2.11 finds those tensors with ``tree_flatten``
    (``FSDPState._register_pre_backward_hook``), to which an unregistered dataclass is one opaque
    leaf: the router got no hook, nothing waited for its rows' all-gather in backward, and at
    ep=1, where the logits' matmul saved a view of the rows, backward read freed storage
    ("setStorage: ... out of bounds for storage of size 0"). torch 2.13 looks inside dataclasses
    by itself; registered, both versions hook the same tensors (logits and mixture weights)."""
    from torch.utils import _pytree as pytree

    if Routing not in pytree.SUPPORTED_NODES:
        pytree.register_dataclass(Routing)


def least_padding_placement(shards: int):
    """FSDP's ``shard_placement_fn``: split each tensor on the first dimension ``shards`` divides,
    else on the one that pads least. Dimension 0 alone would leave Mixtral's one expert per EP
    rank [1, D, 2F] on one EDP rank and a padded copy of it on every other."""
    from torch.distributed.tensor import Shard

    def placement(param: torch.Tensor):
        sizes = comm.local_tensor(param).shape
        if not sizes:
            return None
        padding = [-size % shards / size if size else float("inf") for size in sizes]
        return Shard(min(range(len(sizes)), key=lambda dim: (padding[dim] > 0, padding[dim], dim)))

    return placement


def _distribute_expert_parameters(model: nn.Module, ep_mesh) -> None:
    """Replace every expert-parallel parameter [E_local, ...] by the global [E, ...] DTensor it
    is this rank's Shard(0) of (no data moves)."""
    from torch.distributed.tensor import DTensor, Shard

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not is_expert_parallel(param):
                continue
            global_param = DTensor.from_local(param.data, ep_mesh, [Shard(0)], run_check=False)
            setattr(module, name, nn.Parameter(global_param, requires_grad=param.requires_grad))

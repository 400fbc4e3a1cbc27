"""Optimizer pieces: parameter groups, the LR schedule, and gradient reduction over the right groups."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..moe import comm
from .parallel import ParallelGroups
from ..moe.router import is_expert_parallel


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases, embeddings and router rows do not.

    Expert and dense parameters are kept in separate groups (``expert_parallel`` flag) so
    engines that reduce them differently can tell them apart.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.dim() < 2 or "norm" in name or name.startswith("embed") or ".router." in name
        groups.setdefault((is_expert_parallel(p), no_decay), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if no_decay else weight_decay,
         "expert_parallel": expert, "name": f"{'expert' if expert else 'dense'}-{'nodecay' if no_decay else 'decay'}"}
        for (expert, no_decay), ps in sorted(groups.items())
    ]


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``min_ratio * peak`` at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def reduce_gradients(model: nn.Module, groups: ParallelGroups) -> None:
    """Average gradients so every rank holds the gradient of the global mean loss.

    Dense: all-reduce over the world. Experts (and router rows): their gradient already sums the
    contributions of every EP rank's tokens (through the all-to-all / all-gather backward), so
    they are summed over EDP only and divided by the world size. Reducing an expert gradient
    over the world would make it ep times too large.
    """
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (expert if is_expert_parallel(p) else dense).append(p)
    for params, group in ((dense, groups.world_group), (expert, groups.edp_group)):
        if not params:
            continue
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        comm.all_reduce_sum(flat, group)
        flat /= groups.world_size
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


def global_grad_norm(model: nn.Module, groups: ParallelGroups) -> torch.Tensor:
    """The norm of the full model's gradient: dense once, each expert once (summed over EP)."""
    dense_sq = torch.zeros((), dtype=torch.float64)
    expert_sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if is_expert_parallel(p):
            expert_sq += sq
        else:
            dense_sq += sq
    comm.all_reduce_sum(expert_sq, groups.ep_group)
    return (dense_sq + expert_sq).sqrt()


def clip_gradients(model: nn.Module, total_norm: torch.Tensor, max_norm: float) -> None:
    if max_norm <= 0 or not torch.isfinite(total_norm):
        return
    scale = max_norm / (float(total_norm) + 1e-6)
    if scale < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

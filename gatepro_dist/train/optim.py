"""Optimizer pieces: parameter groups, the LR schedule, and gradient reduction over the right groups."""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..moe import comm
from ..moe.router import is_expert_parallel
from .parallel import ParallelGroups


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


def lr_at(step: int, *, peak: float, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
          decay_fraction: float = 0.2, decay_shape: str = "linear") -> float:
    """The learning rate of 0-based ``step``: linear warmup to ``peak`` over ``warmup`` steps, then

    - ``cosine``: cosine decay to ``min_ratio * peak`` at ``total``;
    - ``linear``: straight-line decay to ``min_ratio * peak`` at ``total``;
    - ``wsd`` (warmup-stable-decay): ``peak`` until the last ``round(decay_fraction * total)``
      steps, which decay to ``min_ratio * peak`` (reached at the last step), linearly or as
      ``1 - sqrt`` of the decay's progress (``decay_shape``);
    - ``constant``: ``peak``.
    """
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    floor = min_ratio * peak
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        into_decay = step - (total - decay_steps) + 1  # 1 at the first decaying step, decay_steps at the last
        if into_decay <= 0:
            return peak
        progress = min(1.0, into_decay / decay_steps)
        remaining = 1 - math.sqrt(progress) if decay_shape == "1-sqrt" else 1 - progress
        return floor + (peak - floor) * remaining
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return floor + (peak - floor) * (1 - progress)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def scheduled_lr(step: int, t) -> float:
    """``lr_at`` with the schedule of a ``TrainConfig`` ``t``."""
    return lr_at(step, peak=t.lr, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio,
                 schedule=t.lr_schedule, decay_fraction=t.decay_fraction, decay_shape=t.decay_shape)


def schedule_change_problem(saved_train, train, steps_done: int) -> str | None:
    """Why resuming a run saved with ``saved_train`` under ``train`` (both ``TrainConfig``) after
    ``steps_done`` steps would rewrite its past, or None when it would not.

    The rule: a resumed run's learning rates must continue the ones it already took. ``train.steps``
    is not part of the config hash (a run may be extended), but it is the decay horizon: extending a
    cosine or linear run changes the lr of steps already taken (the curve is stretched under them),
    so that is refused unless ``train.allow_schedule_change=true``. WSD's stable phase simply extends
    as long as the resume point is before both decays begin; a constant schedule never changes.
    """
    if train.allow_schedule_change or saved_train.steps == train.steps:
        return None
    changed = [s for s in range(steps_done) if scheduled_lr(s, saved_train) != scheduled_lr(s, train)]
    if not changed:
        return None
    return (f"train.steps changed from {saved_train.steps} to {train.steps}, which changes the "
            f"{train.lr_schedule} schedule's lr at steps already taken (first: step {changed[0] + 1}, "
            f"{scheduled_lr(changed[0], saved_train):.3g} -> {scheduled_lr(changed[0], train):.3g}); keep "
            f"train.steps={saved_train.steps}, use train.lr_schedule=wsd to extend a run, or set "
            "train.allow_schedule_change=true")


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
    """The norm of the full model's gradient: dense once, each expert once (summed over EP).

    A 0-dim fp64 tensor on the gradients' device, nothing read: ``torch._foreach_norm`` computes
    every parameter's norm in fp64 in one call (no fp64 copy of any gradient), and the expert
    part is summed over the EP group where the gradients live (NCCL on GPUs). Under
    ``parallel.dp_shard`` every rank holds a disjoint shard of every gradient: the squares of
    all of them are summed over the world instead.
    """
    dense, expert = [], []
    for p in model.parameters():
        if p.grad is not None:
            (expert if is_expert_parallel(p) else dense).append(comm.local_tensor(p.grad.detach()))
    device = (dense or expert)[0].device if dense or expert else torch.device("cpu")
    dense_sq, expert_sq = _sum_of_squares(dense, device), _sum_of_squares(expert, device)
    if groups.dp_shard:
        total_sq = dense_sq + expert_sq
        comm.all_reduce_sum(total_sq, groups.world_group)
        return total_sq.sqrt()
    comm.all_reduce_sum(expert_sq, groups.ep_group)
    return (dense_sq + expert_sq).sqrt()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
    return torch.stack(norms).square().sum()


def clip_gradients(model: nn.Module, total_norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients to ``max_norm`` when the norm exceeds it, without reading the norm back:
    the scale is a device tensor, 1 when there is nothing to clip (x * 1 == x exactly) or when
    the norm is not finite (that step is skipped anyway)."""
    if max_norm <= 0:
        return
    grads = [comm.local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    scale = (max_norm / (total_norm + 1e-6)).clamp(max=1.0)
    scale = torch.where(torch.isfinite(total_norm), scale, torch.ones_like(scale))
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, same in by_dtype.items():
        torch._foreach_mul_(same, scale.to(dtype))


def gradient_sync(model: nn.Module, groups: ParallelGroups):
    """What reduces gradients over the ranks: FSDP's reduce-scatters under ``parallel.dp_shard``,
    else ``OverlappedGradReducer``. Both are armed before each backward and finished after the
    last."""
    return FsdpGradSync(model) if groups.dp_shard else OverlappedGradReducer(model, groups)


class FsdpGradSync:
    """FSDP2 reduce-scatters each module's gradients during backward by itself; with
    ``grad_accum`` > 1 earlier micro-batches only accumulate (``set_requires_gradient_sync``)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def arm(self, last_micro_batch: bool) -> None:
        self.model.set_requires_gradient_sync(last_micro_batch)

    def finish(self) -> None:
        pass


class OverlappedGradReducer:
    """``reduce_gradients``' result, with the communication started during backward.

    Parameters are cut into buckets (dense ones reduced over the world, expert ones over EDP
    only -- never the world), in reverse registration order, which is roughly the order backward
    finishes them; dense and expert buckets are numbered together in that order. A
    ``register_post_accumulate_grad_hook`` on every parameter counts the ones whose gradient is
    complete. Buckets *start* in their number order and in no other: a complete bucket waits
    until every bucket before it has started. So every rank issues the same collectives in the
    same order whatever its autograd graph looks like (a rank whose experts received no rows
    builds another graph and may finish gradients in another order): on NCCL a different order
    of collectives on two ranks is a hang. ``finish`` starts what never fired, in number order
    (parameters without a gradient this step get zeros, as in ``reduce_gradients``), waits, and
    divides by the world size: per element the same sum and the same division as before.

    Memory: a bucket's flat copy lives only while its reduction is in flight. On the CPU the
    reduction is blocking (``comm.all_reduce_sum_async``), so the copy is written back and freed
    at once; on a device at most ``max_in_flight`` copies exist: starting one more first finishes
    the oldest (on a GPU its ``wait`` orders the streams, the host does not block).

    With ``grad_accum`` > 1 only the last micro-batch's backward is armed: earlier ones just
    accumulate locally, so the reduction sees the summed gradient exactly once.

    The hooks hold the reducer weakly. A hook is stored in the parameter's C++ autograd data,
    which Python's garbage collector cannot see into: a strong reference would make a cycle
    (parameter -> hook -> reducer -> bucket -> parameter) that is never freed, and with it the
    process groups, whose gloo worker threads then outlive ``destroy_process_group`` and abort
    the process at interpreter exit (``cluster.spawn`` and ``cli.train`` rely on this).
    """

    def __init__(self, model: nn.Module, groups: ParallelGroups, bucket_bytes: int = 25 * 2**20,
                 max_in_flight: int = 2):
        self.groups, self.armed, self.max_in_flight = groups, False, max_in_flight
        self.buckets: list[_Bucket] = []
        self.next_to_start = 0  # buckets start in index order only
        self.in_flight: list[_Bucket] = []
        if groups.world_size == 1:  # nothing to communicate, and dividing by 1 changes nothing
            return
        open_bucket: dict[bool, _Bucket] = {}
        for p in [q for q in model.parameters() if q.requires_grad][::-1]:
            expert = is_expert_parallel(p)
            nbytes = p.numel() * p.element_size()
            bucket = open_bucket.get(expert)
            if bucket is None or (bucket.params and bucket.nbytes + nbytes > bucket_bytes):
                bucket = open_bucket[expert] = _Bucket(groups.edp_group if expert else groups.world_group)
                self.buckets.append(bucket)
            bucket.params.append(p)
            bucket.nbytes += nbytes
            p.register_post_accumulate_grad_hook(_grad_ready_hook(weakref.ref(self), self.buckets.index(bucket)))

    def arm(self, last_micro_batch: bool) -> None:
        """Call before each backward: reduce during this one only if it is the step's last."""
        self.armed = last_micro_batch and bool(self.buckets)
        self.next_to_start = 0
        for bucket in self.buckets:
            bucket.ready = 0

    def grad_ready(self, index: int) -> None:
        """One more gradient of bucket ``index`` is complete; start every bucket that may start."""
        if not self.armed:
            return
        self.buckets[index].ready += 1
        while (self.next_to_start < len(self.buckets)
               and self.buckets[self.next_to_start].ready == len(self.buckets[self.next_to_start].params)):
            self._start_next()

    def _start_next(self) -> None:
        bucket = self.buckets[self.next_to_start]
        self.next_to_start += 1
        if len(self.in_flight) >= self.max_in_flight:
            self.in_flight.pop(0).finish(self.groups.world_size)
        bucket.start()
        if bucket.work is None:  # blocking reduction (CPU, or one rank): done already
            bucket.finish(self.groups.world_size)
        else:
            self.in_flight.append(bucket)

    def finish(self) -> None:
        """Start what never fired (in index order), wait for every reduction, write the averages back."""
        while self.next_to_start < len(self.buckets):
            self._start_next()
        for bucket in self.in_flight:
            bucket.finish(self.groups.world_size)
        self.in_flight, self.armed = [], False


def _grad_ready_hook(reducer: weakref.ref, index: int):
    def hook(param: torch.Tensor) -> None:
        live = reducer()
        if live is not None:
            live.grad_ready(index)
    return hook


class _Bucket:
    def __init__(self, group):
        self.group, self.params, self.nbytes = group, [], 0
        self.ready, self.flat, self.work = 0, None, None
        self.starts = 0  # reductions started so far (tests read it)

    def start(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.flat = _flatten_dense_tensors([p.grad for p in self.params])
        self.work = comm.all_reduce_sum_async(self.flat, self.group)
        self.starts += 1

    def finish(self, world_size: int) -> None:
        """Wait for the reduction, write the averaged gradients back, and free the flat copy."""
        if self.work is not None:
            self.work.wait()
        self.flat /= world_size
        grads = [p.grad for p in self.params]
        for g, reduced in zip(grads, _unflatten_dense_tensors(self.flat, grads)):
            g.copy_(reduced)
        self.flat, self.work = None, None

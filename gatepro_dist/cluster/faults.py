"""Deliberate faults for reliability testing, switched on by the GATEPRO_FAULT variable.

Unset (the normal case) every hook here is a no-op. A fault is ``KIND:key=value,...``:

    kill:at=all_to_all,step=3,rank=1,hit=2   SIGKILL rank 1 at the 2nd all-to-all of step 3
    nan:layer=1,step=3                       block 1's output becomes NaN in step 3 (every rank,
                                             or only ``rank=``); ``value=inf`` for +Inf
    inf_grad:layer=2,step=4                  layer 2's gradients become Inf after backward in step 4
    hot_expert:expert=0                      the router sends every token to expert 0 (and, with
                                             top-k > 1, to whichever experts come next), all steps

Kill points (``at=``): ``forward`` (start of each transformer block), ``all_to_all`` (every token
all-to-all, forward and backward), ``optimizer`` (just before the optimizer step) and
``checkpoint`` (after this rank wrote its checkpoint shards, before the checkpoint is complete).
Steps count like ``metrics.jsonl``: step 1 is the first optimizer step. ``hit`` (default 1) picks
the n-th time the point is reached within the step.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

import torch

from ..config import ConfigError

ENV = "GATEPRO_FAULT"
KINDS = ("kill", "nan", "inf_grad", "hot_expert")
KILL_POINTS = ("forward", "all_to_all", "optimizer", "checkpoint")


@dataclass
class Fault:
    kind: str
    at: str | None = None
    step: int | None = None
    rank: int | None = None
    layer: int | None = None
    hit: int = 1
    expert: int = 0
    value: float = float("nan")
    hits: dict = field(default_factory=dict)  # (step, point) -> times reached


def parse(text: str | None) -> Fault | None:
    """``None`` for an empty spec; ValueError (one line naming the fix) for a malformed one."""
    if not text:
        return None
    kind, _, rest = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"{ENV}={text!r}: unknown fault kind {kind!r}; use one of {', '.join(KINDS)}")
    fault = Fault(kind)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in ("at", "step", "rank", "layer", "hit", "expert", "value"):
            raise ValueError(f"{ENV}={text!r}: bad item {item!r}; write key=value with keys "
                             "at, step, rank, layer, hit, expert, value")
        setattr(fault, key, value if key == "at" else float(value) if key == "value" else int(value))
    if kind == "kill" and fault.at not in KILL_POINTS:
        raise ValueError(f"{ENV}={text!r}: kill needs at= one of {', '.join(KILL_POINTS)}")
    return fault


_fault: Fault | None = None
_problem: str | None = None
_step = 0


def install(text: str | None) -> None:
    """Use the fault `text` (None: no fault) in this process; a malformed one is kept as a problem
    that `check` reports (so importing this module never fails)."""
    global _fault, _problem
    try:
        _fault, _problem = parse(text), None
    except ValueError as err:
        _fault, _problem = None, str(err)


def check() -> None:
    """Raise ConfigError if GATEPRO_FAULT is malformed (the CLI calls this before any work)."""
    if _problem:
        raise ConfigError(_problem)


install(os.environ.get(ENV))


def set_step(step: int) -> None:
    """The trainer announces the optimizer step (1-based) it is about to run."""
    global _step
    _step = step


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def _targets(kind: str, layer: int | None = None) -> bool:
    check()
    f = _fault
    return (f is not None and f.kind == kind and (f.step is None or f.step == _step)
            and (f.rank is None or f.rank == _rank()) and (f.layer is None or f.layer == layer))


def point(name: str) -> None:
    """Kill this process here if the fault says so (counting hits of `name` within the step)."""
    if not _targets("kill") or _fault.at != name:
        return
    key = (_step, name)
    _fault.hits[key] = _fault.hits.get(key, 0) + 1
    if _fault.hits[key] == _fault.hit:
        os.kill(os.getpid(), signal.SIGKILL)


def corrupt_activation(x: torch.Tensor, layer: int) -> torch.Tensor:
    if not _targets("nan", layer):
        return x
    return x + torch.full_like(x[..., :1], _fault.value)


def corrupt_gradients(model: torch.nn.Module) -> None:
    """Make every gradient of block ``layer`` Inf (the ``inf_grad`` fault)."""
    if _fault is None or not _targets("inf_grad", _fault.layer):
        return
    for p in model.layers[_fault.layer].parameters():
        if p.grad is not None:
            p.grad.fill_(float("inf"))


def skew_logits(logits_TN: torch.Tensor) -> torch.Tensor:
    """The ``hot_expert`` fault: one expert's logit dominates every token's."""
    if not _targets("hot_expert"):
        return logits_TN
    boost = torch.zeros(logits_TN.shape[-1], dtype=logits_TN.dtype, device=logits_TN.device)
    boost[_fault.expert] = 1e4
    return logits_TN + boost

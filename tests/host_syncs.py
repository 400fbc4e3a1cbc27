"""Count host-device synchronisations on the CPU (docs/DESIGN §5): the operations that, on CUDA,
make the host wait for the device to read a value back.

A ``TorchDispatchMode`` sees every aten call: ``_local_scalar_dense`` (``item``/``int``/``float``/
``bool`` of a tensor), ``nonzero``, ``masked_select``, and ``repeat_interleave`` without
``output_size`` (it must read the repeats to size its output); ``Tensor.tolist`` does not go
through dispatch, so it is wrapped (one read, whatever it does inside). On CUDA ``bincount`` also
reads the maximum back: it is counted too. What is counted is a number of reads, the same on
every run: tests assert counts, never times.

Copies between the host and a device are counted by their direction, which the CPU-only suite
sees only when a second device takes part (``meta``, or the fake accelerator of
``tests/fake_accelerator.py``); a CPU-to-CPU copy is no synchronisation and is never counted:

* ``to_host``: ``aten._to_copy`` to the CPU from another device (``.cpu()``, ``.to("cpu")``,
  ``.numpy(force=True)``, which copies the same way) and ``aten.copy_`` into a CPU tensor from a
  device tensor. The host waits for the device to reach the copy.
* ``h2d_blocking``: ``aten._to_copy`` / ``aten.copy_`` from the CPU to a device with
  ``non_blocking=False``. On CUDA a copy from pageable memory returns only once it is done, so the
  host waits for everything queued before it (pinned memory and ``non_blocking=True`` avoid it).

``count_host_syncs(cpu_is_device=False)`` is for runs with a device other than the CPU: reads of
CPU tensors are then host memory (AdamW's ``step`` counters, values exchanged over gloo) and are
not counted; by default the CPU plays the device, as on this machine every tensor is a CPU one.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_ALWAYS_SYNC = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.bincount.default: "bincount",
}


_paused = False


def _on_cpu(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def _copy_kind(func, args, kwargs) -> str | None:
    """``to_host`` / ``h2d_blocking`` for a copy between the CPU and another device, else None."""
    if func is _aten._to_copy.default:
        source, target = args[0], kwargs.get("device")
        if target is None:  # a dtype or layout change on the same device
            return None
        target, non_blocking = torch.device(target), kwargs.get("non_blocking", False)
    elif func is _aten.copy_.default:
        source, target = args[1], args[0].device
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return None
    if not isinstance(source, torch.Tensor) or (source.device.type == "cpu") == (target.type == "cpu"):
        return None
    if target.type == "cpu":
        return "to_host"
    return None if non_blocking else "h2d_blocking"


class _SyncCounter(TorchDispatchMode):
    def __init__(self, counts: Counter, cpu_is_device: bool):
        super().__init__()
        self.counts, self.cpu_is_device = counts, cpu_is_device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not _paused:
            name = _ALWAYS_SYNC.get(func)
            if name is None and func.overloadpacket is _aten.repeat_interleave and kwargs.get("output_size") is None:
                name = "repeat_interleave"
            if name is not None and not self.cpu_is_device and args and _on_cpu(args[0]):
                name = None  # host memory read by the host
            name = name or _copy_kind(func, args, kwargs)
            if name is not None:
                self.counts[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs(cpu_is_device: bool = True):
    """``with count_host_syncs() as counts: ...``; ``sum(counts.values())`` is the number of reads
    (and copies: see the module docstring)."""
    counts: Counter = Counter()
    original_tolist = torch.Tensor.tolist

    def counted_tolist(self):
        global _paused
        if _paused or (not cpu_is_device and self.device.type == "cpu"):
            return original_tolist(self)
        counts["tolist"] += 1
        # One read: whatever the implementation does inside (CUDA copies the tensor to the host
        # first, a fake tensor reads element by element) is that read, not more.
        previous, _paused = _paused, True
        try:
            return original_tolist(self)
        finally:
            _paused = previous

    torch.Tensor.tolist = counted_tolist
    try:
        with _SyncCounter(counts, cpu_is_device):
            yield counts
    finally:
        torch.Tensor.tolist = original_tolist


@contextmanager
def not_counted():
    """Reads that are host memory on every device, which this CPU-only machine cannot tell apart
    from device reads (e.g. AdamW's ``state["step"]``: torch keeps it on the CPU unless the
    optimizer is capturable or fused, precisely so that its ``item()`` is no device sync)."""
    global _paused
    previous, _paused = _paused, True
    try:
        yield
    finally:
        _paused = previous

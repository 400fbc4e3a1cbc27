"""Count host-device synchronisations on the CPU (docs/DESIGN §5): the operations that, on CUDA,
make the host wait for the device to read a value back.

A ``TorchDispatchMode`` sees every aten call: ``_local_scalar_dense`` (``item``/``int``/``float``/
``bool`` of a tensor), ``nonzero``, ``masked_select``, and ``repeat_interleave`` without
``output_size`` (it must read the repeats to size its output); ``Tensor.tolist`` does not go
through dispatch, so it is wrapped. On CUDA ``bincount`` also reads the maximum back: it is
counted too. What is counted is a number of reads, the same on every run: tests assert counts,
never times.
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


class _SyncCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = None if _paused else _ALWAYS_SYNC.get(func)
        if name is None and not _paused and func.overloadpacket is _aten.repeat_interleave and kwargs.get("output_size") is None:
            name = "repeat_interleave"
        if name is not None:
            self.counts[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_host_syncs():
    """``with count_host_syncs() as counts: ...``; ``sum(counts.values())`` is the number of reads."""
    counts: Counter = Counter()
    original_tolist = torch.Tensor.tolist

    def counted_tolist(self):
        if not _paused:
            counts["tolist"] += 1
        return original_tolist(self)

    torch.Tensor.tolist = counted_tolist
    try:
        with _SyncCounter(counts):
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

"""Step state on the device: AdamW's state lands where torch's own kernels expect it when a
checkpoint is loaded, and batches reach the device without blocking the host.

On CUDA the trainer's AdamW is fused; torch creates a fused optimizer's ``step`` counter on the
parameter's device and its kernel never checks: a counter left on the CPU by the checkpoint
loader is read through a host pointer (an illegal memory access on the first resumed step).
The ``meta`` device plays the GPU here (it refuses to be mixed with the CPU), and
``capturable=True`` asks for the same on-device counter as ``fused=True`` does on CUDA (fused
AdamW has no meta kernel; the rule that places the counter is the same). The full resume on a
device, DCP I/O included, is in tests/test_fake_accelerator.py where the fake device can go.
"""
from __future__ import annotations

import torch

from gatepro_dist.train.checkpoint import MOMENTS, _state
from gatepro_dist.train.model import Transformer
from gatepro_dist.train.optim import param_groups
from gatepro_dist.train.parallel import single_process_groups
from test_trainer import tiny_config


def _meta_model(tmp_path):
    with torch.device("meta"):
        return Transformer(tiny_config(tmp_path))


def test_a_loaded_on_device_optimizer_keeps_its_step_counter_on_the_parameters_device(tmp_path):
    model = _meta_model(tmp_path)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, capturable=True)
    state = _state(model, optimizer, single_process_groups(), materialize=True)
    steps = {k: v for k, v in state.items() if k.endswith(".step")}
    assert len(steps) == len(list(model.parameters()))
    assert {t.device.type for t in steps.values()} == {"meta"}
    moments = [v for k, v in state.items() if k.rsplit(".", 1)[-1] in MOMENTS]
    assert moments and {t.device.type for t in moments} == {"meta"}


def test_a_host_counter_optimizer_keeps_its_step_counter_in_host_memory(tmp_path):
    # foreach (the CPU trainer's kind) keeps ``step`` on the CPU so reading it is no device sync.
    model = _meta_model(tmp_path)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, foreach=True)
    state = _state(model, optimizer, single_process_groups(), materialize=True)
    assert {v.device.type for k, v in state.items() if k.endswith(".step")} == {"cpu"}


def test_batches_go_to_the_device_without_blocking_the_host():
    """A batch copied from pageable host memory blocks the host on CUDA; ``to_device`` asks for an
    asynchronous copy (and pins the batch first on CUDA, a branch this machine cannot run)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from gatepro_dist.train.step import to_device

    copies = []

    class RecordCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default:
                copies.append((kwargs.get("device"), kwargs.get("non_blocking", False)))
            return func(*args, **kwargs)

    batch = torch.randint(0, 100, (2, 8))
    with RecordCopies():
        moved = to_device(batch, torch.device("meta"))
        same = to_device(batch, torch.device("cpu"))
    assert moved.device.type == "meta" and same is batch
    assert copies == [(torch.device("meta"), True)]

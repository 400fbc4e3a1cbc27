"""A fake accelerator that runs autograd, for a machine without a GPU (docs/DESIGN §5).

``fgpu`` is torch's PrivateUse1 device, registered from Python with no kernels of its own; every
tensor on it is a ``FakeTensor`` (``FakeTensorMode``): shapes, dtypes and devices are computed,
values are not. It is a device that is *not the CPU*, which is what this CPU-only suite lacks
elsewhere: mixing it with a CPU tensor fails (``FakeTensorDeviceMismatchError``) as it would on
CUDA, copies between it and the host are seen (``host_syncs``), and -- unlike a fake ``cuda`` on a
CPU-only build, which aborts the process in backward -- autograd runs on it. Autocast runs on it
(the module's ``get_amp_supported_dtype``, a fallthrough for ``AutocastPrivateUse1``, and CUDA's
casting rules for the matmuls and the fp32 ops this model meets: torch has none for PrivateUse1).
FSDP2 runs on it too (streams and events that do nothing).

What it cannot show: values (a fake tensor has none), so every read of one -- ``item()``,
``tolist()``, ``numpy()`` -- must be *answered* by the test: ``FakeReads`` names each read by the
engine function that made it and asks the test's table of documented reads for a value; a read
the table does not list fails as ``UndocumentedHostRead``. Code behind ``device.type == "cuda"``
does not run on it, nor C++ paths that read host memory (DCP's file I/O, gloo).

Use (or the ``fake_device`` fixture, imported into the test module)::

    device = install()                                   # once per process, idempotent
    with fake_process_group(world=4, rank=1), fake_tensors(), FakeReads(answers) as reads:
        ...                                              # tensors made on ``device`` are fake
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE_TYPE = "fgpu"
# Reads are named after the first frame of these packages, walking out from the read.
ENGINE_PACKAGES = ("gatepro_dist.", "torch.optim.")

_libraries = None  # the autocast registrations, kept alive: a dropped Library deregisters its kernels
_active_reads: "FakeReads | None" = None
_in_use = 0  # fake-device contexts open: outside them torch.accelerator reports no accelerator


def _host_waits(what: str) -> None:
    """A stream, event or device ``synchronize``: the host waits for the device. Logged as a read."""
    if _active_reads is not None:
        frame = sys._getframe(2)
        _active_reads.log.append(Read(site_of(frame), what, DEVICE_TYPE))


class _Event:
    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        _host_waits("event.synchronize")


class _Stream:
    """What FSDP2 asks of a device's streams (``device_handle.Stream``, ``current_stream``):
    ordering between streams does not exist on a device that computes nothing."""

    def __init__(self, priority: int = 0):
        self.priority = priority

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None) -> _Event:
        return event or _Event()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        _host_waits("stream.synchronize")


class _FakeBackendModule:
    """``torch.fgpu``: one device, autocast in bf16/fp16, and streams and events that do nothing.
    It is available only inside the contexts below, so that registering it changes nothing for
    the rest of the suite in the same process (``torch.accelerator.is_available()`` stays False)."""

    Stream, Event = _Stream, _Event

    def __init__(self):
        self._current = _Stream()

    def is_initialized(self) -> bool:
        return True

    def is_available(self) -> bool:
        return _in_use > 0

    def _is_in_bad_fork(self) -> bool:
        return False

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        return 1 if _in_use else 0

    def set_device(self, device) -> None:
        pass

    def manual_seed_all(self, seed: int) -> None:
        pass

    def get_amp_supported_dtype(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16]

    def current_stream(self, device=None) -> _Stream:
        return self._current

    @contextmanager
    def stream(self, stream):
        yield

    def synchronize(self, device=None) -> None:
        _host_waits("synchronize")


class _Hooks(torch._C._acc.PrivateUse1Hooks):
    def is_available(self) -> bool:
        return _in_use > 0

    def has_primary_context(self, device_index) -> bool:
        return True

    def is_built(self) -> bool:
        return True


@contextmanager
def _available():
    global _in_use
    _in_use += 1
    try:
        yield
    finally:
        _in_use -= 1


# Autocast's casting rules for the ops this model meets, as CUDA's autocast has them
# (aten/src/ATen/autocast_mode.cpp): torch registers none for PrivateUse1 -- a backend brings its
# own -- and without them autocast on ``fgpu`` would be enabled and cast nothing.
_LOWER_PRECISION_OPS = ("mm", "addmm", "bmm", "baddbmm", "addbmm", "addmv", "mv", "matmul", "linear",
                        "scaled_dot_product_attention")
_FP32_OPS = ("softmax.int", "log_softmax.int", "logsumexp", "exp", "log", "rsqrt", "pow.Tensor_Scalar",
             "pow.Tensor_Tensor", "cross_entropy_loss", "nll_loss", "mse_loss", "layer_norm")


def _register_autocast():
    from torch.utils._pytree import tree_map

    autocast_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastPrivateUse1)

    def rule(op_name: str, lower_precision: bool):
        packet, _, overload = op_name.partition(".")
        op = getattr(getattr(torch.ops.aten, packet), overload or "default")

        def kernel(keyset, *args, **kwargs):
            dtype = torch.get_autocast_dtype(DEVICE_TYPE) if lower_precision else torch.float32

            def cast(a):
                eligible = isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == DEVICE_TYPE
                return a.to(dtype) if eligible and a.dtype != torch.float64 else a

            args, kwargs = tree_map(cast, (args, kwargs))
            with torch._C._ExcludeDispatchKeyGuard(autocast_keys):
                return op(*args, **kwargs)

        return kernel

    library = torch.library.Library("_", "IMPL")
    library.fallback(torch.library.fallthrough_kernel, dispatch_key="AutocastPrivateUse1")
    rules = torch.library.Library("aten", "IMPL")
    for names, lower in ((_LOWER_PRECISION_OPS, True), (_FP32_OPS, False)):
        for op_name in names:
            rules.impl(op_name, rule(op_name, lower), "AutocastPrivateUse1", with_keyset=True)
    return library, rules


def install() -> torch.device:
    """Register ``fgpu`` (once per process) and let the fake process group serve it."""
    global _libraries
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401  registers "fake"

    name = torch._C._get_privateuse1_backend_name()
    if name != DEVICE_TYPE:
        if name != "privateuseone":
            raise RuntimeError(f"PrivateUse1 is already the {name!r} backend in this process; "
                               "the fake accelerator needs it (run these tests in a process of their own)")
        from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

        _setup_privateuseone_for_python_backend(DEVICE_TYPE, backend_module=_FakeBackendModule(), hook=_Hooks())
        _libraries = _register_autocast()
    devices = dist.Backend.backend_capability[dist.Backend.FAKE]
    if DEVICE_TYPE not in devices:
        devices.append(DEVICE_TYPE)
    return torch.device(DEVICE_TYPE)


@contextmanager
def fake_process_group(world: int, rank: int):
    """``rank`` of a world of ``world`` ranks in this one process: collectives return at once and
    move nothing (``torch.testing._internal.distributed.fake_pg``), on the CPU and on ``fgpu``."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    install()
    with _available(), _meshes_outside_fake_mode():
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextmanager
def _meshes_outside_fake_mode():
    """A ``DeviceMesh`` keeps which rank sits where in CPU tensors and finds itself with
    ``nonzero()``: host bookkeeping, no device involved. FSDP2 builds meshes on the fly (2-D
    placements of the experts); made under ``FakeTensorMode`` those tensors would be fake and
    their ``nonzero`` has no shape. They are built outside it, as host objects."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import DeviceMesh

    original = DeviceMesh.__init__

    def init(self, *args, **kwargs):
        with unset_fake_temporarily():
            original(self, *args, **kwargs)

    DeviceMesh.__init__ = init
    try:
        yield
    finally:
        DeviceMesh.__init__ = original


@contextmanager
def fake_tensors():
    """Every tensor made inside is fake; host tensors made outside (a data batch) are let in."""
    install()
    with _available(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


@pytest.fixture
def fake_device():
    """The fake accelerator's device, with fake tensors on for the whole test."""
    device = install()
    with fake_tensors():
        yield device


class UndocumentedHostRead(AssertionError):
    pass


@dataclass(frozen=True)
class Read:
    site: str  # the engine function that read, e.g. "read_step" (see ``site_of``)
    kind: str  # "item", "tolist", "numpy", or a "synchronize" of the device, a stream or an event
    device: str  # where the tensor lived: "fgpu" is a device read, "cpu" host memory


Answer = Callable[[torch.Tensor, FrameType], Any]


def engine_frame(packages: tuple[str, ...] = ENGINE_PACKAGES) -> FrameType:
    """The innermost frame of ``packages`` (module name prefixes) on the current stack."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(packages):
            return frame
        frame = frame.f_back
    raise UndocumentedHostRead(f"a fake tensor was read outside {', '.join(packages)} (by the test itself?)")


def site_of(frame: FrameType) -> str:
    """The name of the function that read (``read_step``, ``GroupedExperts.forward``): not its
    module, so that moving a function between files does not change the documented reads."""
    return getattr(frame.f_code, "co_qualname", frame.f_code.co_name)


class _AnswerItems(TorchDispatchMode):
    def __init__(self, reads: "FakeReads"):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            if isinstance(args[0], FakeTensor):
                return self.reads.answer("item", args[0])
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():  # a real tensor (host data made outside): read it
                return func(*args)
        return func(*args, **(kwargs or {}))


class FakeReads:
    """Answer every read of a fake tensor from ``answers`` (site -> ``answer(tensor, frame)``, which
    returns what ``tolist()`` would: a number for a 0-dim tensor, nested lists otherwise) and log it
    in ``self.log``. The site is the innermost function of ``packages`` (the engine, by default).
    Enter it after ``fake_tensors()`` and before ``host_syncs.count_host_syncs``, so that the
    counter sees each read first and counts it once. A real (host) tensor is read as it is."""

    def __init__(self, answers: dict[str, Answer], packages: tuple[str, ...] = ENGINE_PACKAGES):
        self.answers, self.packages = answers, packages
        self.log: list[Read] = []

    def answer(self, kind: str, tensor: torch.Tensor, device: torch.device | None = None):
        frame = engine_frame(self.packages)
        site = site_of(frame)
        self.log.append(Read(site, kind, (device or tensor.device).type))
        if site not in self.answers:
            where = f"{frame.f_globals['__name__']}, {frame.f_code.co_filename}:{frame.f_lineno}"
            raise UndocumentedHostRead(f"{kind}() of a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device} "
                                       f"in {site} ({where}), a read the test does not document")
        return self.answers[site](tensor, frame)

    def __enter__(self) -> "FakeReads":
        global _active_reads
        self.outer, _active_reads = _active_reads, self
        self.tolist, self.numpy = torch.Tensor.tolist, torch.Tensor.numpy
        self.fake_tolist = FakeTensor.__dict__.get("tolist")
        original_tolist, original_numpy = self.tolist, self.numpy

        def tolist(t):
            return self.answer("tolist", t) if isinstance(t, FakeTensor) else original_tolist(t)

        def numpy(t, *, force: bool = False):
            if not isinstance(t, FakeTensor):
                return original_numpy(t, force=force)
            device = t.device
            if force:  # as torch does: the copy to the host is made (and seen by a counter)
                t = t.detach().cpu()
            return np.array(self.answer("numpy", t, device))

        torch.Tensor.tolist, torch.Tensor.numpy = tolist, numpy
        # FakeTensor reads element by element with item(); one tolist() is one read.
        FakeTensor.tolist = lambda t: torch.Tensor.tolist(t)
        self.mode = _AnswerItems(self)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        global _active_reads
        _active_reads = self.outer
        self.mode.__exit__(*exc)
        torch.Tensor.tolist, torch.Tensor.numpy = self.tolist, self.numpy
        if self.fake_tolist is None:
            del FakeTensor.tolist
        else:
            FakeTensor.tolist = self.fake_tolist


def answer_zeros(tensor: torch.Tensor, frame: FrameType):
    """Zeros of the tensor's shape and dtype: a loss of 0, a finite flag, empty statistics."""
    return np.zeros(tuple(tensor.shape), dtype=np.float64 if tensor.dtype.is_floating_point else np.int64).tolist()



def prime_autograd_engine() -> None:
    """Run one backward on the fake device before any other backward of the process.

    autograd starts its per-device worker queues at a process's first backward, sized by the device
    counts it sees then; a device that appears later has no queue ("device_ready_queues_" internal
    assert). The suite's first backward is usually a CPU one in another test, so ``tests/conftest.py``
    calls this at session start, while the fake device counts one device."""
    device = install()
    with fake_tensors():
        x = torch.ones(2, device=device, requires_grad=True)
        (x * 2).sum().backward()

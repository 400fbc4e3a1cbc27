"""Every tensor the engine makes lives on the device of the data it meets, and every collective
gets tensors on its group's device -- checked on a machine without a GPU (DESIGN §5).

The ``meta`` device plays the GPU: it refuses to mix with CPU tensors, so a ``torch.eye(n)`` or a
``torch.zeros(())`` made without ``device=`` fails here as it would on CUDA. Two stand-ins, and
only these, replace what cannot exist on this machine:

* ``StandInNccl``: a process group serving *only* the meta device, as an NCCL-only group serves
  only CUDA. NCCL cannot run here; the stand-in records every collective and refuses any tensor
  that is not on meta (a CPU tensor there is exactly the crash NCCL would give). It does not
  communicate: placement is what is checked, not sums (real gloo groups check the sums elsewhere).
* ``meta_reads_return_zero``: meta tensors hold no values, so the few reads a step makes (the
  split sizes, the step's one batched read) return zeros instead of the device-to-host copy a GPU
  would make. Without it the test could not run past the first read; with it, what runs after a
  read is checked too.

What this file does not reach: its MoE layer runs at ep=1 and its split sizes read as zeros, so
no expert computes a row, and the stand-in group runs no ep > 1 all-to-all, no FSDP2 and no
optimizer. Those are checked for placement in ``tests/test_fake_accelerator.py``: the whole
training step (``trainer.train``) on a fake accelerator that runs autograd, at ep 1, 2 and 4, with
and without ``parallel.dp_shard``, in fp32 and bf16, dropless and with a capacity, with split sizes
that give every expert rows; and the optimizer state a resume materialises. The tests here stay:
they name the three crashes of the issue, and check the DeepSpeed finiteness check and the
router's gather/reduce-scatter pair against a group that refuses other devices.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils._python_dispatch import TorchDispatchMode

from gatepro_dist.backends.deepspeed_trainer import _all_finite
from gatepro_dist.moe import comm
from gatepro_dist.moe.layer import MoELayer, MoESpec
from gatepro_dist.moe.router import mark_expert_parallel
from gatepro_dist.moe.routing import gate_similarity_stats
from gatepro_dist.train.optim import OverlappedGradReducer, clip_gradients, global_grad_norm, reduce_gradients
from gatepro_dist.train.parallel import ParallelGroups
from gatepro_dist.train.step import StepStats, read_step

META = torch.device("meta")


class _DoneWork(dist._Work):
    def __init__(self, result):
        super().__init__()
        self.future = torch.futures.Future()
        self.future.set_result(result)

    def wait(self, timeout=None):
        return True

    def get_future(self):
        return self.future


class StandInNccl(dist.ProcessGroup):
    """A meta-only group of 2 ranks (see the module docstring): records, refuses other devices."""

    calls: list[tuple[str, list[torch.device]]] = []

    def _check(self, kind: str, *tensors: torch.Tensor) -> _DoneWork:
        devices = [t.device for t in tensors]
        StandInNccl.calls.append((kind, devices))
        assert all(d == META for d in devices), f"{kind} got tensors on {devices}, the group's device is meta"
        return _DoneWork(list(tensors))

    def allreduce(self, tensors, opts):
        return self._check("all_reduce", *tensors)

    def all_gather_single(self, out, inp, opts):
        return self._check("all_gather", out, inp)

    def _allgather_base(self, out, inp, opts):  # what torch < 2.13's all_gather_into_tensor calls
        return self._check("all_gather", out, inp)

    def reduce_scatter_single(self, out, inp, opts):
        return self._check("reduce_scatter", out, inp)

    def _reduce_scatter_base(self, out, inp, opts):
        return self._check("reduce_scatter", out, inp)

    def all_to_all_single(self, out, inp, output_splits, input_splits, opts):
        return self._check("all_to_all", out, inp)

    def getBackendName(self):
        return "standin_nccl"


if "standin_nccl" not in dist.Backend.backend_list:
    dist.Backend.register_backend("standin_nccl", lambda store, rank, world, timeout: StandInNccl(rank, world),
                                  devices=["meta"])


@pytest.fixture
def standin_groups():
    """dp x ep = 1 x 2 on the stand-in: the world, EP and (for the reducer) EDP group are one group."""
    dist.init_process_group("standin_nccl", store=FakeStore(), rank=0, world_size=2)
    StandInNccl.calls = []
    world = dist.group.WORLD
    try:
        yield ParallelGroups(2, 0, 2, 0, 1, 0, world, world, world, None)
    finally:
        dist.destroy_process_group()


class _MetaReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == META:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


class meta_reads_return_zero:
    def __enter__(self):
        self.tolist = torch.Tensor.tolist
        original = self.tolist
        torch.Tensor.tolist = lambda t: (torch.zeros(t.shape, dtype=t.dtype).tolist() if t.device == META
                                         else original(t))
        self.mode = _MetaReads()
        self.mode.__enter__()

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self.tolist


class TwoKinds(nn.Module):
    """A dense and an expert-parallel parameter, with gradients."""

    def __init__(self, device: torch.device):
        super().__init__()
        # Made on the device, not moved: ``.to(meta)`` replaces Parameter objects (dropping the
        # expert flag), which ``.to(cuda)`` does not.
        self.dense = nn.Parameter(torch.empty(3, 4, device=device))
        self.expert = mark_expert_parallel(nn.Parameter(torch.empty(2, 4, 5, device=device)))


def model_on_meta() -> TwoKinds:
    model = TwoKinds(META)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    return model


# ---- the three crashes of the issue -------------------------------------------------------------

def test_similarity_stats_make_every_tensor_on_the_weights_device():
    """Crash 1: the off-diagonal mask was made on the CPU (fails on the old code with "Tensor on
    device meta is not on the expected device cpu")."""
    stats = gate_similarity_stats(torch.randn(8, 16).to(META))
    assert set(stats) == {"mean_cos", "mean_abs_cos", "mean_nearest_cos", "mean_angle_deg", "spectral_entropy"}
    assert all(v.device == META and v.dim() == 0 for v in stats.values())


def test_grad_norm_reduces_expert_squares_on_the_gradients_device(standin_groups):
    """Crash 2: the expert part was moved to the CPU and all-reduced there (an NCCL group refuses
    it; on the old code this test fails at that ``.cpu()``)."""
    model = model_on_meta()
    norm = global_grad_norm(model, standin_groups)
    assert norm.device == META and norm.dtype == torch.float64
    assert [kind for kind, _ in StandInNccl.calls] == ["all_reduce"]  # the expert part, over EP
    clip_gradients(model, norm, max_norm=1.0)
    assert all(p.grad.device == META for p in model.parameters())


def test_deepspeed_finiteness_check_reduces_on_the_losss_device(standin_groups):
    """Crash 3: the flag was a CPU tensor all-reduced over the world (the old code fails here: the
    stand-in refuses its CPU tensor)."""
    loss = torch.empty((), device=META)
    with meta_reads_return_zero():
        assert _all_finite(loss, standin_groups)
    assert StandInNccl.calls == [("all_reduce", [META])]


# ---- the rest of the engine ---------------------------------------------------------------------

@pytest.mark.parametrize("moe", [dict(), dict(capacity_factor=1.0), dict(capacity_factor=1.0, drop_policy="probs")],
                         ids=["dropless", "capacity-position", "capacity-probs"])
def test_moe_layer_forward_backward_and_step_statistics_stay_on_the_device(moe, standin_groups):
    torch.manual_seed(0)
    layer = MoELayer(MoESpec(hidden_size=16, num_experts=8, top_k=2, expert_ffn_dim=16, num_shared_experts=1,
                             penalty=0.05, **moe)).to(META)
    # bf16 tokens: grouped_mm's meta kernel checks what CUDA's does (bf16 operands, aligned strides).
    x = torch.empty(24, 16, device=META, dtype=torch.bfloat16, requires_grad=True)
    with meta_reads_return_zero():
        out, stats = layer(x)
        (out.square().sum() + stats.loss).backward()
        step_stats = StepStats()
        step_stats.add([stats])
        readout = read_step(torch.zeros((), device=META), 1, torch.zeros((), dtype=torch.float64, device=META),
                            step_stats, standin_groups)
    for value in (stats.tokens_per_expert, stats.total_tokens, stats.dropped_tokens, stats.gatepro_penalised,
                  stats.gatepro_topk_changed, stats.expert_rows_max, stats.loss, x.grad):
        assert value.device == META
    assert all(p.grad.device == META for p in layer.parameters())
    assert len(readout.moe) == 1
    assert [kind for kind, _ in StandInNccl.calls] == ["all_reduce", "all_reduce"]  # sums, then maxima


def test_gradient_reduction_runs_on_the_gradients_device(standin_groups):
    model = model_on_meta()
    reduce_gradients(model, standin_groups)
    reducer = OverlappedGradReducer(model, standin_groups)
    reducer.arm(last_micro_batch=True)
    reducer.finish()
    assert [kind for kind, _ in StandInNccl.calls] == ["all_reduce"] * 4  # dense + expert, twice
    assert all(p.grad.device == META for p in model.parameters())


def test_router_gather_and_its_reduce_scatter_run_on_the_weights_device(standin_groups):
    weight = torch.empty(4, 16, device=META, requires_grad=True)
    gathered = comm.all_gather_rows(weight, standin_groups.ep_group)
    gathered.sum().backward()
    assert [kind for kind, _ in StandInNccl.calls] == ["all_gather", "reduce_scatter"]
    assert weight.grad.device == META and weight.grad.shape == weight.shape

"""train.dtype=bf16 is bf16 where it pays: the tokens the experts multiply are bf16 (the grouped GEMM's
fast path), the loss moves by bf16 rounding and no more, and the device switches are set where the
trainer meets its device. The all-to-all's halved bytes are in test_comm_model.py; the router's fp32
guard in test_routing.py; the refused shapes in test_bad_inputs.py.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gatepro_dist.config import ConfigError, TrainConfig, load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.moe.layer import MoELayer, MoESpec
from gatepro_dist.train.numerics import adamw, set_numerics
from test_trainer import run_training

FP32_NOISE = 1e-5  # rel. loss difference of fp32 runs that only reorder sums is < 1e-7 (test_deepspeed_backend)
BF16_ROUNDING = 2.0 ** -9  # bf16's unit roundoff (8 significant bits)
# The layer tests run on this device: `gatepro-bench gpu` sets cuda, where grouped_mm's fast path is real.
DEVICE = torch.device(os.environ.get("GATEPRO_TEST_DEVICE", "cpu"))


class GroupedMMCalls(TorchDispatchMode):
    """Every aten._grouped_mm call below autograd (so the backward's calls too): operands' dtype and strides."""

    def __init__(self):
        super().__init__()
        self.calls: list[list[tuple[torch.dtype, tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._grouped_mm.default:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            self.calls.append([(t.dtype, t.stride()) for t in tensors])
        return func(*args, **kwargs)


def _layer_step_calls(autocast_dtype: torch.dtype | None) -> list:
    layer = MoELayer(MoESpec(hidden_size=32, num_experts=4, top_k=2, expert_ffn_dim=24)).to(DEVICE)
    x_TD = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    with GroupedMMCalls() as recorder:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast_dtype is not None):
            out_TD, stats = layer(x_TD)
        assert out_TD.dtype == torch.float32  # the residual stream stays fp32
        (out_TD.square().mean() + stats.loss).backward()
    assert layer.experts.gate_up_proj.grad.dtype == torch.float32  # fp32 master weights get fp32 gradients
    return recorder.calls


def test_bf16_expert_gemms_take_bf16_operands_with_16_byte_rows_forward_and_backward():
    """The sm90 grouped GEMM's preconditions, checked on the CPU: bf16 operands, int32 offsets, every
    non-unit stride a multiple of 8 elements. fp32 operands would take the per-expert fallback."""
    calls = _layer_step_calls(torch.bfloat16)
    assert len(calls) == 6  # 2 forward (gate_up, down) + 2 x 2 backward (input and weight gradients)
    for x, w, offsets in calls:
        assert x[0] == w[0] == torch.bfloat16, calls
        assert offsets[0] == torch.int32
        assert all(s % 8 == 0 for s in (*x[1], *w[1]) if s != 1), calls


def test_fp32_expert_gemms_stay_fp32():
    calls = _layer_step_calls(None)
    assert len(calls) == 6 and all(x[0] == w[0] == torch.float32 for x, w, _ in calls)


def test_bf16_training_moves_the_loss_by_bf16_rounding_not_more(tmp_path):
    """Same data, same init: bf16 changes the losses (it is not ignored) by less than bf16's unit roundoff."""
    fp32 = run_training(1, tmp_path / "fp32", "train.steps=4")
    bf16 = run_training(1, tmp_path / "bf16", "train.steps=4", "train.dtype=bf16")
    relative = [abs(b - a) / a for a, b in zip(fp32, bf16)]
    assert max(relative) > FP32_NOISE, relative
    assert max(relative) < BF16_ROUNDING, relative
    assert bf16[-1] < bf16[0]


def test_the_bf16_shape_rule_binds_only_the_bf16_grouped_gemm(tmp_path):
    base = ["model.d_model=36", "model.n_heads=2", "model.n_kv_heads=1", f"train.run_dir={tmp_path}"]
    validate(load_config(None, base), 1)  # fp32: any width
    validate(load_config(None, [*base, "train.dtype=bf16", "moe.grouped_gemm=false"]), 1)
    with pytest.raises(ConfigError, match=r"^model.d_model=36 is not a multiple of 8.*model.d_model=40 "):
        validate(load_config(None, [*base, "train.dtype=bf16"]), 1)


@pytest.fixture
def restore_numerics():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.are_deterministic_algorithms_enabled())
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.use_deterministic_algorithms(saved[2])


def test_cuda_fp32_uses_tf32_unless_deterministic(restore_numerics):
    cuda = torch.device("cuda", 0)  # only flags are set: no CUDA needed
    set_numerics(TrainConfig(), cuda, environ={})
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    environ = {}
    set_numerics(TrainConfig(deterministic=True), cuda, environ=environ)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert environ == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} and torch.are_deterministic_algorithms_enabled()


def test_deterministic_cuda_refuses_a_nondeterministic_cublas_workspace(restore_numerics):
    with pytest.raises(ConfigError, match=r"^train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG .* ':0:0'; "):
        set_numerics(TrainConfig(deterministic=True), torch.device("cuda", 0),
                     environ={"CUBLAS_WORKSPACE_CONFIG": ":0:0"})


def test_cpu_numerics_leave_the_cuda_flags_and_environment_alone(restore_numerics):
    torch.backends.cuda.matmul.allow_tf32 = False
    environ = {}
    set_numerics(TrainConfig(deterministic=True), torch.device("cpu"), environ=environ)
    assert environ == {} and not torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("device, flag", [("cpu", "foreach"), ("cuda", "fused")])
def test_adamw_takes_the_devices_fast_update(device, flag):
    optimizer = adamw([torch.nn.Parameter(torch.zeros(2))], TrainConfig(), torch.device(device))
    assert optimizer.param_groups[0][flag] is True

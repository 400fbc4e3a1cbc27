"""GateProTopKRouter (megatron-core 0.16) on CPU: Megatron's routing with GatePro equals our router.

Megatron's MoE layer needs CUDA (its router moves the weight to the GPU in ``gating``, and even
with that placement patched, ``router_gating_linear`` fails on CPU without Transformer Engine:
NameError ``te_general_gemm`` in 0.16.1), so these tests compute the logits as ``gating`` does and
feed the CPU tensors straight to ``routing``, which is where GatePro plugs in; nothing is patched. The full layer is checked on a GPU by
``gatepro_dist/integrations/megatron_gpu_check.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from gatepro_dist.integrations.megatron_router import GateProTopKRouter, gatepro_moe_module_spec, use_gatepro_router
from gatepro_dist.moe.router import GateProRouter
from gatepro_dist.moe.routing import load_balancing_loss, router_z_loss

D, N = 16, 8


@pytest.fixture(scope="module")
def process_groups():
    """Megatron routers hold tp/cp groups; a one-rank gloo group stands in for all of them."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    from megatron.core.process_groups_config import ProcessGroupCollection

    world = dist.group.WORLD
    yield ProcessGroupCollection(tp=world, cp=world, tp_cp=world, tp_dp_cp=world)
    if started:
        dist.destroy_process_group()


def _config(top_k=2, **extra):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=2, num_moe_experts=N,
                             moe_router_topk=top_k, moe_router_dtype="fp32", add_bias_linear=False,
                             use_cpu_initialization=True, **extra)


def _tokens(seed=0):
    return torch.randn(4, 24, D, generator=torch.Generator().manual_seed(seed))  # [seq, batch, hidden]


def _route(router, x_SBD):
    logits = x_SBD.float() @ router.weight.float().t()  # what Router.gating computes, on CPU
    return router.routing(logits)


@pytest.mark.parametrize("top_k, pre_softmax", [(1, True), (2, False), (2, True), (4, False)])
@pytest.mark.parametrize("training", [False, True])
def test_megatron_routing_with_gatepro_equals_our_router(process_groups, top_k, pre_softmax, training):
    """Same routing map (bool, exactly k per token) and probabilities; training logs aux and z losses equal
    to ours on the penalised logits, eval logs none.

    Megatron's pre-softmax probabilities (required for k=1) are our normalize_topk=False; its
    default, softmax over the selected k, is our normalize_topk=True.
    """
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    penalty = 0.05
    extra = {"moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 1e-3} if training else {"moe_aux_loss_coeff": 0.0}
    router = GateProTopKRouter(_config(top_k, moe_router_pre_softmax=pre_softmax, **extra), process_groups,
                               penalty=penalty)
    router.set_layer_number(1)
    router.train(training)
    ours = GateProRouter(D, N, top_k, penalty=penalty, normalize_topk=not pre_softmax)
    with torch.no_grad():  # seeded, so the check below does not depend on the global RNG
        router.weight.copy_(torch.randn(N, D, generator=torch.Generator().manual_seed(top_k)) * 0.15)
        ours.weight.copy_(router.weight)

    x = _tokens()
    clear_aux_losses_tracker()
    probs_TN, routing_map_TN = _route(router, x)
    expected = ours(x.reshape(-1, D))
    expected_probs_TN = torch.zeros(x.shape[0] * x.shape[1], N).scatter(1, expected.experts_TK, expected.weights_TK)
    assert routing_map_TN.dtype == torch.bool and bool((routing_map_TN.sum(dim=1) == top_k).all())
    assert torch.equal(routing_map_TN, expected_probs_TN > 0)
    torch.testing.assert_close(probs_TN, expected_probs_TN, rtol=1e-6, atol=1e-7)
    if top_k > 1:
        assert expected.gatepro_topk_changed > 0  # the penalty really changed some choices

    # The losses Megatron logs (per unit coefficient): what our pure functions give on the penalised
    # logits (Megatron computes them inside routing, after GatePro: see megatron_router.py), and
    # nothing at all in eval mode.
    tracked = {name: float(entry["values"][0]) for name, entry in get_moe_layer_wise_logging_tracker().items()}
    if not training:
        assert not any(tracked.values()), tracked
        return
    penalised_TN = router.penalised_logits(x.float() @ router.weight.float().t()).reshape(-1, N)
    counts_N = torch.zeros(N).scatter_add_(0, penalised_TN.topk(top_k, dim=1).indices.flatten(),
                                           torch.ones(penalised_TN.shape[0] * top_k))
    aux = float(load_balancing_loss(penalised_TN, counts_N, penalised_TN.shape[0], top_k))
    z = float(router_z_loss(penalised_TN))
    assert tracked["load_balancing_loss"] == pytest.approx(aux, rel=1e-6)
    assert tracked["z_loss"] == pytest.approx(z, rel=1e-6)
    raw_TN = x.reshape(-1, D) @ router.weight.t()  # the penalty moves z by more than the tolerance
    assert abs(float(router_z_loss(raw_TN)) - z) > 1e-4 * z


def test_penalty_zero_or_switched_off_is_plain_top_k_then_softmax_over_k(process_groups):
    """Off, or at penalty 0, the router is Megatron's top-k with softmax over the k chosen: checked
    against that top-k written here, and on tokens where GatePro on (0.05) routes differently."""
    gatepro = GateProTopKRouter(_config(), process_groups, penalty=0.0)
    with torch.no_grad():
        gatepro.weight.copy_(torch.randn(N, D, generator=torch.Generator().manual_seed(5)) * 0.15)
    x = _tokens(1)
    logits_TN = (x @ gatepro.weight.t()).reshape(-1, N)
    top = logits_TN.topk(2, dim=1)
    expected_map = torch.zeros(logits_TN.shape, dtype=torch.bool).scatter(1, top.indices, True)
    expected_probs = torch.zeros(logits_TN.shape).scatter(1, top.indices, torch.softmax(top.values, dim=1))
    assert torch.equal(gatepro.penalised_logits(logits_TN), logits_TN)  # delta is exactly 0 at penalty 0

    for penalty, enabled in [(0.0, True), (0.05, False)]:
        gatepro.penalty, gatepro.gatepro_enabled = penalty, enabled
        probs_TN, map_TN = _route(gatepro, x)
        assert torch.equal(map_TN, expected_map), (penalty, enabled)
        torch.testing.assert_close(probs_TN, expected_probs, rtol=1e-6, atol=1e-7)
    gatepro.gatepro_enabled = True
    assert not torch.equal(_route(gatepro, x)[1], expected_map)  # the switch really switches


def test_penalised_logits_stay_fp32_for_bf16_logits(process_groups):
    """In bf16, l - 1e-4 == l for |l| > ~0.05: the penalty must be added in fp32."""
    router = GateProTopKRouter(_config(), process_groups, penalty=1e-4)
    logits = (_tokens(2).float() @ router.weight.t()).to(torch.bfloat16)
    penalised = router.penalised_logits(logits)
    assert penalised.dtype == torch.float32 and penalised.shape == logits.shape
    assert bool(((penalised - logits.float()) != 0).any())


def test_constructor_accepts_newer_megatron_keyword_arguments(process_groups):
    """megatron-core >= 0.17 passes extra keyword arguments to routers; 0.16's TopKRouter takes none."""
    with pytest.warns(UserWarning, match="future_option"):
        router = GateProTopKRouter(config=_config(), pg_collection=process_groups, penalty=1e-3, future_option=1)
    assert router.penalty == 1e-3


def test_specs_build_the_gatepro_router(process_groups):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    for spec in (gatepro_moe_module_spec(N, penalty=2e-4),
                 use_gatepro_router(get_gpt_layer_local_spec(num_experts=N), penalty=2e-4).submodules.mlp):
        router = spec.submodules.router(config=_config(), pg_collection=process_groups)
        assert isinstance(router, GateProTopKRouter) and router.penalty == 2e-4
    with pytest.raises(ValueError, match="no MoE layer"):
        use_gatepro_router(get_gpt_layer_local_spec())


def test_gpu_check_maps_megatron_expert_weights_onto_ours(process_groups):
    """The weight mapping the GPU check relies on, checked on CPU with Megatron's own SwiGLU experts."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from gatepro_dist.integrations.megatron_gpu_check import load_megatron_weights
    from gatepro_dist.moe import MoELayer, MoESpec

    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    try:
        config = _config(ffn_hidden_size=32, moe_ffn_hidden_size=32, gated_linear_unit=True, activation_func=F.silu)
        spec = gatepro_moe_module_spec(N)
        experts_spec, pgs = spec.submodules.experts, get_default_pg_collection()
        experts = (build_module(experts_spec, N, config, pg_collection=pgs) if isinstance(experts_spec, ModuleSpec)
                   else experts_spec(N, config, pg_collection=pgs))  # megatron-core >= 0.17: a builder
        router = spec.submodules.router(config=config, pg_collection=process_groups)
        ours = MoELayer(MoESpec(hidden_size=D, num_experts=N, top_k=2, expert_ffn_dim=32, grouped_gemm=False))
        load_megatron_weights(ours, router.weight.detach(), experts)
        assert torch.equal(ours.router.weight, router.weight)

        rows_per_expert = 5
        x_MD = torch.randn(N * rows_per_expert, D, generator=torch.Generator().manual_seed(3))
        expected = torch.cat([expert(rows)[0] for expert, rows in
                              zip(experts.local_experts, x_MD.split(rows_per_expert))])
        got = ours.experts(x_MD, torch.full((N,), rows_per_expert))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        parallel_state.destroy_model_parallel()

"""A GatePro router for Megatron-core's ``MoELayer``.

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from gatepro_dist.integrations.megatron_router import use_gatepro_router

    layer_spec = use_gatepro_router(get_gpt_layer_local_spec(num_experts=16), penalty=1e-4)
    model = GPTModel(config, transformer_layer_spec=layer_spec, ...)

``GateProTopKRouter`` subclasses Megatron's ``TopKRouter`` and overrides only ``routing``: it adds
GatePro's penalty delta to the logits, in fp32, and calls Megatron's own ``routing`` -- so top-k,
score function, capacity, aux/z losses and expert bias stay Megatron's. Megatron keeps the router
weight whole on every rank (it is not sharded over EP), so every rank computes the same pairs.

Differences from our native router, on purpose (Megatron computes its losses inside ``routing``):
the aux and z losses see the penalised logits (their values move by O(lambda), their gradients
with respect to the logits do not); probabilities come out in fp32 even when the model runs bf16
(``moe_router_dtype="fp32"`` is recommended anyway, so that the comparison l_i < l_j is made on
fp32 logits).

Supported megatron-core: 0.16 (the newest on Python 3.11; ``MoESubmodules.router`` exists since
0.16.0) and 0.17+ (Python 3.12), whose router constructor takes extra keyword arguments: they are
passed on to ``TopKRouter`` when it accepts them.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import warnings

import torch

from ..moe.routing import check_penalty, gatepro_delta, most_similar_expert

try:
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.spec_utils import ModuleSpec
except ImportError as err:  # pragma: no cover - exercised only without megatron
    raise ImportError(
        "gatepro_dist.integrations.megatron_router needs megatron-core >= 0.16 "
        "(pip install 'megatron-core==0.16.1' on Python 3.11)") from err

_PARENT_INIT = inspect.signature(TopKRouter.__init__).parameters
_PARENT_TAKES_ANY_KWARG = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in _PARENT_INIT.values())


class GateProTopKRouter(TopKRouter):
    """Megatron's ``TopKRouter`` with GatePro's penalty added to the logits before its top-k.

    ``gatepro_enabled`` is a plain attribute (hot swap at any step); off, or with ``penalty=0``,
    the router is exactly ``TopKRouter``.
    """

    def __init__(self, config, pg_collection=None, *, penalty: float = 1e-4, gatepro_enabled: bool = True,
                 **kwargs):
        check_penalty(penalty)
        if config.num_moe_experts is None or config.num_moe_experts < 2:
            raise ValueError(f"num_moe_experts={config.num_moe_experts}: GatePro needs at least two experts")
        super().__init__(config=config, pg_collection=pg_collection, **_accepted_by_parent(kwargs))
        self.penalty, self.gatepro_enabled = penalty, gatepro_enabled

    def routing(self, logits: torch.Tensor, *args, **kwargs):
        if self.gatepro_enabled and self.penalty > 0:
            logits = self.penalised_logits(logits)
        return super().routing(logits, *args, **kwargs)

    def penalised_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """l~ = l + delta in fp32, same shape as ``logits`` ([seq, batch, experts] or [tokens, experts])."""
        logits_TN = logits.reshape(-1, self.config.num_moe_experts).float()
        rival_N = most_similar_expert(self.weight)
        return (logits_TN + gatepro_delta(logits_TN, rival_N, self.penalty)).view(logits.shape)


def _accepted_by_parent(kwargs: dict) -> dict:
    """Keyword arguments newer Megatron passes to routers, filtered to what this TopKRouter takes."""
    if _PARENT_TAKES_ANY_KWARG:
        return kwargs
    dropped = sorted(set(kwargs) - set(_PARENT_INIT))
    if dropped:
        warnings.warn(f"GateProTopKRouter: this megatron-core's TopKRouter takes no {dropped}; ignored",
                      stacklevel=3)
    return {k: v for k, v in kwargs.items() if k in _PARENT_INIT}


def gatepro_router(penalty: float = 1e-4):
    """A router builder for ``MoESubmodules.router`` (called as ``router(config=, pg_collection=)``)."""
    check_penalty(penalty)
    return functools.partial(GateProTopKRouter, penalty=penalty)


def use_gatepro_router(spec: ModuleSpec, penalty: float = 1e-4) -> ModuleSpec:
    """A copy of ``spec`` (a MoE layer, transformer layer or block spec) whose MoE routers are GatePro.

    Raises ValueError when the spec contains no MoE layer (e.g. built without ``num_experts``).
    """
    spec = copy.deepcopy(spec)
    found = _replace_routers(spec, gatepro_router(penalty))
    if not found:
        raise ValueError("the spec contains no MoE layer (MoESubmodules); build it with num_experts=N")
    return spec


def gatepro_moe_module_spec(num_experts: int, penalty: float = 1e-4, use_te: bool = False,
                            moe_grouped_gemm: bool = False) -> ModuleSpec:
    """Megatron's MoE layer spec (``get_moe_module_spec``) with the GatePro router."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    base = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm)
    return use_gatepro_router(base, penalty)


def _replace_routers(node, router) -> int:
    if isinstance(node, MoESubmodules):
        node.router = router
        return 1
    if isinstance(node, ModuleSpec):
        return _replace_routers(node.submodules, router)
    if isinstance(node, (list, tuple)):
        return sum(_replace_routers(item, router) for item in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return sum(_replace_routers(getattr(node, f.name), router) for f in dataclasses.fields(node))
    return 0

"""A GatePro gate for DeepSpeed MoE models.

    from deepspeed.moe.layer import MoE
    from gatepro_dist.integrations.deepspeed_gate import use_gatepro

    moe = MoE(hidden_size=512, expert=mlp, num_experts=16, ep_size=2, k=2)
    use_gatepro(moe, penalty=1e-4)          # before deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=model, ...)

DeepSpeed's ``MoE`` takes no gate argument, so ``use_gatepro`` swaps the ``TopKGate`` inside it for
``GateProGate``, a ``TopKGate`` subclass that keeps the *same* ``wg`` linear (same parameter, same
name, so checkpoints and optimizer groups are unchanged). The gate computes fp32 logits, adds
GatePro's penalty (pairs from the cosine similarity of ``wg``'s rows, ``routing.most_similar_expert``)
and hands the penalised logits to DeepSpeed's own top-1/top-2/top-k gating functions -- so capacity,
token dropping and the dispatch format stay DeepSpeed's. Random token selection, Gumbel sampling of
the second expert and noisy gating are switched off: they would perturb the very competition
GatePro decides. DeepSpeed's gate keeps ``wg`` replicated on every rank, so every EP rank computes
the same pairs.

The balance loss (``l_aux``) uses DeepSpeed's formula for ``k`` with probabilities from the *raw*
logits and assignments from the penalised ones, as our own router does (docs/gatepro.md).

Supported DeepSpeed: 0.19.x. Its gate contract changed inside 0.19: from 0.19.4 ``MOELayer`` calls
``gate(x, used_token, sparse_routes=True, use_tutel)`` and expects a 7-tuple of sparse routes;
before, ``gate(x, used_token, use_tutel)`` and a 4-tuple of dense combine weights. ``GateProGate``
reads which contract the installed DeepSpeed has from its gating functions and speaks that one.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..moe.routing import check_penalty, gatepro_delta, most_similar_expert

try:
    from deepspeed.moe import sharded_moe
    from deepspeed.moe.sharded_moe import TopKGate
except ImportError as err:  # pragma: no cover - exercised only without deepspeed
    raise ImportError(
        "gatepro_dist.integrations.deepspeed_gate needs DeepSpeed 0.19.x: install it after torch with "
        "`DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19,<0.20'`") from err

# >= 0.19.4: gating functions take sparse_routes and the gate returns sparse routes when asked.
SPARSE_ROUTES_CONTRACT = "sparse_routes" in inspect.signature(sharded_moe.topkgating).parameters


class GateProGate(TopKGate):
    """DeepSpeed's ``TopKGate`` with GatePro's penalty on the logits before top-k.

    ``gatepro_enabled`` is a plain attribute (hot swap at any step); with it off or ``penalty=0``
    the gate equals ``TopKGate`` with ``use_rts=False``, ``top2_2nd_expert_sampling=False`` and no
    noisy gating.
    """

    def __init__(self, model_dim: int, num_experts: int, k: int = 1, capacity_factor: float = 1.0,
                 eval_capacity_factor: float = 1.0, min_capacity: int = 8, drop_tokens: bool = True,
                 ep_group=None, *, penalty: float = 1e-4, gatepro_enabled: bool = True):
        check_penalty(penalty)
        if num_experts < 2:
            raise ValueError(f"num_experts={num_experts}: GatePro needs at least two experts to pair")
        super().__init__(model_dim, num_experts, k, capacity_factor, eval_capacity_factor, min_capacity,
                         noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False, ep_group=ep_group,
                         top2_2nd_expert_sampling=False)
        self.penalty, self.gatepro_enabled = penalty, gatepro_enabled

    @classmethod
    def replacing(cls, gate: TopKGate, penalty: float = 1e-4) -> "GateProGate":
        """A GatePro gate with ``gate``'s settings, sharing its ``wg`` (the very same parameter)."""
        num_experts, model_dim = gate.wg.weight.shape
        new = cls(model_dim, num_experts, gate.k, gate.capacity_factor, gate.eval_capacity_factor,
                  gate.min_capacity, gate.drop_tokens, penalty=penalty)
        new.wg = gate.wg
        new.ep_group = gate.ep_group  # set already if the layer joined its process groups
        new.wall_clock_breakdown = gate.wall_clock_breakdown
        new.train(gate.training)
        return new

    def penalised_logits(self, logits_TN: torch.Tensor) -> torch.Tensor:
        if not (self.gatepro_enabled and self.penalty > 0):
            return logits_TN
        rival_N = most_similar_expert(self.wg.weight)
        return logits_TN + gatepro_delta(logits_TN, rival_N, self.penalty)

    def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, *args, **kwargs):
        sparse_routes, use_tutel = _call_flags(args, kwargs)
        # fp32 on purpose: in bf16, l - 1e-4 == l for |l| > ~0.05 and GatePro would vanish.
        logits_TN = F.linear(input.float(), self.wg.weight.float())
        chosen_by_TN = self.penalised_logits(logits_TN)
        capacity_factor = self.capacity_factor if self.training else self.eval_capacity_factor
        sparse = {"sparse_routes": sparse_routes} if SPARSE_ROUTES_CONTRACT else {}
        if self.k == 1:
            out = sharded_moe.top1gating(chosen_by_TN, capacity_factor, self.min_capacity, used_token,
                                         noisy_gate_policy=None, drop_tokens=self.drop_tokens, use_rts=False,
                                         ep_group=self.ep_group, use_tutel=use_tutel, **sparse)
        elif self.k == 2:
            out = sharded_moe.top2gating(chosen_by_TN, capacity_factor, self.min_capacity, self.drop_tokens,
                                         self.ep_group, top2_2nd_expert_sampling=False, **sparse)
        else:
            out = sharded_moe.topkgating(chosen_by_TN, self.k, capacity_factor, self.min_capacity,
                                         self.drop_tokens, self.ep_group, **sparse)
        if chosen_by_TN is not logits_TN:
            out = (deepspeed_balance_loss(logits_TN, chosen_by_TN, self.k, used_token),) + tuple(out[1:])
        return out


def _call_flags(args: tuple, kwargs: dict) -> tuple[bool, bool]:
    """(sparse_routes, use_tutel) from the installed DeepSpeed's gate call convention."""
    names = ("sparse_routes", "use_tutel") if SPARSE_ROUTES_CONTRACT else ("use_tutel",)
    values = dict(zip(names, args)) | kwargs
    unknown = set(values) - set(names)
    if unknown or len(args) > len(names):
        raise TypeError(f"GateProGate.forward got unexpected arguments {sorted(unknown) or args[len(names):]}")
    return bool(values.get("sparse_routes", False)), bool(values.get("use_tutel", False))


def deepspeed_balance_loss(raw_logits_TN: torch.Tensor, chosen_by_TN: torch.Tensor, k: int,
                           used_token: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSpeed's ``l_aux`` for ``k``: mean router probability (raw logits) times assignment
    fraction (from the logits that chose). Top-1/top-2 count first choices, top-k (k > 2) all k.
    Equal to DeepSpeed's own value when both logits are the same tensor.
    """
    num_experts = raw_logits_TN.shape[1]
    mean_prob_N = F.softmax(raw_logits_TN, dim=1).mean(dim=0)
    if k <= 2:
        first_TN = F.one_hot(chosen_by_TN.argmax(dim=1), num_classes=num_experts)
        if used_token is not None and k == 1:
            first_TN = first_TN * used_token.unsqueeze(1)
        return (mean_prob_N * first_TN.float().mean(dim=0)).sum() * num_experts
    top_TK = chosen_by_TN.topk(k, dim=1).indices
    mask_TN = torch.zeros_like(chosen_by_TN, dtype=torch.bool).scatter_(1, top_TK, True)
    return (mean_prob_N * mask_TN.float().mean(dim=0)).mean() * num_experts * num_experts / k


def use_gatepro(moe, penalty: float = 1e-4) -> GateProGate:
    """Replace the gate of a ``deepspeed.moe.layer.MoE`` with GatePro; call before ``deepspeed.initialize``."""
    from deepspeed.moe.layer import MoE

    if not isinstance(moe, MoE):
        raise TypeError(f"use_gatepro expects a deepspeed.moe.layer.MoE, got {type(moe).__name__}")
    layer = moe.deepspeed_moe
    if not isinstance(layer.gate, TopKGate):
        raise TypeError(f"the MoE's gate is a {type(layer.gate).__name__}, not a TopKGate; nothing to replace")
    if isinstance(layer.gate, GateProGate):
        layer.gate.penalty = penalty
        return layer.gate
    layer.gate = GateProGate.replacing(layer.gate, penalty)
    return layer.gate

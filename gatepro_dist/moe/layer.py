"""The MoE layer: router -> dispatch -> experts -> combine, plus per-call statistics."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import comm
from .dispatch import DROP_POLICIES, combine, dispatch, plan_dispatch
from .experts import GroupedExperts, SwiGLU
from .router import GateProRouter, is_expert_parallel
from .routing import load_balancing_loss, router_z_loss


@dataclass(frozen=True)
class MoESpec:
    """Everything that defines one MoE layer (hyper-parameters only, no process groups)."""

    hidden_size: int
    num_experts: int = 16
    top_k: int = 2
    expert_ffn_dim: int = 256
    num_shared_experts: int = 0
    shared_expert_ffn_dim: int | None = None
    shared_expert_gate: bool = False
    capacity_factor: float | None = None  # None: dropless
    drop_policy: str = "position"
    grouped_gemm: bool = True
    gatepro: bool = True
    penalty: float = 1e-4
    gatepro_mode: str = "penalty"  # the reading of GatePro (moe/competition.py)
    gatepro_pairing: str = "similar"
    gatepro_space: str = "logits"
    logit_precision: str = "fp32"
    normalize_topk: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    bias_enabled: bool = False
    bias_update_rate: float = 1e-3
    check_pairs: bool = False
    router_init_std: float | None = None  # None: 1/sqrt(hidden_size)

    def validate(self, ep_size: int = 1) -> None:
        def bad(name, value, fix):
            raise ValueError(f"{name}={value!r} is invalid; {fix}")

        if self.hidden_size < 1:
            bad("hidden_size", self.hidden_size, "use a positive hidden size")
        if self.num_experts < 1:
            bad("num_experts", self.num_experts, "use at least one expert")
        if self.num_experts % ep_size:
            bad("num_experts", self.num_experts, f"it must be divisible by ep={ep_size}")
        if not 1 <= self.top_k <= self.num_experts:
            bad("top_k", self.top_k, f"it must be between 1 and num_experts={self.num_experts}")
        if not (self.penalty >= 0 and self.penalty != float("inf")):
            bad("penalty", self.penalty, "use a finite penalty >= 0 (the paper uses 1e-4)")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            bad("capacity_factor", self.capacity_factor, "use a positive factor, or None for dropless")
        if self.drop_policy not in DROP_POLICIES:
            bad("drop_policy", self.drop_policy, f"pick one of {DROP_POLICIES}")
        if self.expert_ffn_dim < 1:
            bad("expert_ffn_dim", self.expert_ffn_dim, "use a positive size")


@dataclass(frozen=True)
class MoEStats:
    """One forward's statistics. Counts are over the whole EP group; losses are this rank's share.

    Counts are long tensors on the layer's device (0-dim for the scalars), never read here: a
    read per layer would make the host wait for the device at every layer. ``train/step.py``
    reads a whole step's statistics in one batch. ``rows_sent``/``rows_received`` come from the
    split sizes, which the host holds anyway.
    """

    tokens_per_expert: torch.Tensor  # [N] assignments routed to each expert, before drops
    total_tokens: torch.Tensor
    aux_loss: torch.Tensor  # Switch balance loss (this rank's share; differentiable)
    z_loss: torch.Tensor  # router z-loss (this rank's tokens; differentiable)
    loss: torch.Tensor  # aux_loss_coef * aux_loss + z_loss_coef * z_loss: add it to the objective
    dropped_tokens: torch.Tensor  # (token, expert) assignments dropped by capacity
    gatepro_penalised: torch.Tensor  # (token, expert) entries that lost to their rival (penalised or masked)
    gatepro_topk_changed: torch.Tensor  # tokens whose expert set the competition changed
    partner_co_selected: torch.Tensor  # tokens whose set holds an expert and its most similar one
    expert_rows_max: torch.Tensor  # most rows one of this rank's experts computed (<= capacity when set)
    routing_margin: torch.Tensor  # routing.routing_margin_counts of this rank's tokens (not summed over ranks)
    rows_sent: int = 0  # this rank's token rows dispatched to experts on other ranks
    rows_received: int = 0  # rows this rank's experts received from other ranks

    @property
    def zero_token_experts(self) -> torch.Tensor:
        return (self.tokens_per_expert == 0).sum()


class MoELayer(nn.Module):
    """Expert-parallel MoE FFN with the GatePro router.

    ``ep_group=None`` holds every expert in this process; otherwise this rank holds experts
    ``[r * N/ep, (r+1) * N/ep)`` and their router rows, and tokens travel by all-to-all.
    ``balance_group`` (the expert-data-parallel group in training) widens the statistics and the
    balance loss's expert fractions from the EP group's batch to the whole global batch, so the
    objective does not depend on the parallel layout.
    """

    def __init__(self, spec: MoESpec, ep_group=None, balance_group=None):
        super().__init__()
        ep_size = comm.group_size(ep_group)
        spec.validate(ep_size)
        self.spec, self.ep_group, self.balance_group = spec, ep_group, balance_group
        self.router = GateProRouter(
            spec.hidden_size, spec.num_experts, spec.top_k,
            gatepro_enabled=spec.gatepro, penalty=spec.penalty, normalize_topk=spec.normalize_topk,
            bias_enabled=spec.bias_enabled, bias_update_rate=spec.bias_update_rate,
            check_pairs=spec.check_pairs, init_std=spec.router_init_std, ep_group=ep_group,
            mode=spec.gatepro_mode, pairing=spec.gatepro_pairing, space=spec.gatepro_space,
            logit_precision=spec.logit_precision,
        )
        self.experts = GroupedExperts(
            spec.num_experts // ep_size, spec.hidden_size, spec.expert_ffn_dim,
            first_expert=self.router.first_expert, grouped_gemm=spec.grouped_gemm,
        )
        shared_dim = spec.shared_expert_ffn_dim or spec.expert_ffn_dim
        self.shared_experts = (
            SwiGLU(spec.hidden_size, shared_dim * spec.num_shared_experts)
            if spec.num_shared_experts > 0 else None
        )
        self.shared_expert_gate = (
            nn.Linear(spec.hidden_size, 1, bias=False)
            if spec.num_shared_experts > 0 and spec.shared_expert_gate else None
        )

    def reset_expert_parameters(self, seed: int) -> None:
        self.router.reset_parameters(seed)
        self.experts.reset_parameters(seed)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        if x.shape[-1] != self.spec.hidden_size:
            raise ValueError(
                f"MoELayer input has hidden size {x.shape[-1]} but the layer was built with "
                f"hidden_size={self.spec.hidden_size}; pass tokens of the model's d_model"
            )
        x_TD = x.reshape(-1, x.shape[-1])
        routing = self.router(x_TD)
        plan = plan_dispatch(
            routing.experts_TK, routing.weights_TK, self.spec.num_experts, self.ep_group,
            self.spec.capacity_factor, self.spec.drop_policy,
            (routing.gatepro_penalised, routing.gatepro_topk_changed, routing.partner_co_selected),
        )
        counts = _GlobalCounts.of(plan, self.balance_group)
        rows_MD = dispatch(in_compute_dtype(x_TD), plan, self.ep_group)
        expert_out_MD = self.experts(rows_MD, plan.tokens_per_local_expert, plan.rows_per_local_expert)
        out_TD = combine(expert_out_MD, plan, routing.weights_TK, x_TD.shape[0], self.ep_group)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            out_TD = out_TD + shared_TD

        aux = load_balancing_loss(
            routing.logits_TN, counts.tokens_per_expert, counts.total_tokens, self.spec.top_k
        )
        z = router_z_loss(routing.logits_TN)
        stats = MoEStats(
            tokens_per_expert=counts.tokens_per_expert,
            total_tokens=counts.total_tokens,
            aux_loss=aux,
            z_loss=z,
            loss=self.spec.aux_loss_coef * aux + self.spec.z_loss_coef * z,
            dropped_tokens=counts.dropped_tokens,
            gatepro_penalised=counts.gatepro_penalised,
            gatepro_topk_changed=counts.gatepro_topk_changed,
            partner_co_selected=counts.partner_co_selected,
            rows_sent=sum(plan.input_splits) - plan.input_splits[comm.group_rank(self.ep_group)],
            rows_received=sum(plan.output_splits) - plan.output_splits[comm.group_rank(self.ep_group)],
            expert_rows_max=plan.tokens_per_local_expert.amax(),
            routing_margin=routing.margin_counts,
        )
        return out_TD.view_as(x).to(x.dtype), stats


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in autocast's dtype when autocast is on (bf16 training), else unchanged.

    Autocast has no rule for the all-to-all or for ``grouped_mm``: without this cast the fp32
    residual stream would cross ranks in fp32 (twice the bytes) and ``grouped_mm`` would take its
    fp32 fallback (one GEMM per expert). The router keeps reading the fp32 tokens.
    """
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return x.to(torch.get_autocast_dtype(device))
    return x


@dataclass(frozen=True)
class _GlobalCounts:
    tokens_per_expert: torch.Tensor
    total_tokens: torch.Tensor
    dropped_tokens: torch.Tensor
    gatepro_penalised: torch.Tensor
    gatepro_topk_changed: torch.Tensor
    partner_co_selected: torch.Tensor

    @classmethod
    def of(cls, plan, balance_group) -> "_GlobalCounts":
        """The plan's EP-group counts, summed over ``balance_group`` when there is one.

        One all-reduce of the packed counts, left on the device: nothing here waits for it
        (the balance loss consumes it as a tensor, the trainer reads it once per step).
        """
        scalars = [plan.total_tokens, plan.dropped_tokens, plan.gatepro_penalised, plan.gatepro_topk_changed,
                   plan.partner_co_selected]
        if comm.group_size(balance_group) == 1:
            return cls(plan.tokens_per_expert, *scalars)
        packed = torch.cat([plan.tokens_per_expert, torch.stack(scalars)])
        comm.all_reduce_sum(packed, balance_group)
        n = plan.tokens_per_expert.numel()
        return cls(packed[:n], *packed[n:].unbind())


def expert_parallel_shard(global_state: dict[str, torch.Tensor], module: nn.Module,
                          ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """Slice a state dict of the all-experts module down to this rank's experts (and router rows)."""
    params = dict(module.named_parameters())
    out = {}
    for name, tensor in global_state.items():
        if name in params and is_expert_parallel(params[name]):
            rows = tensor.shape[0] // ep_size
            tensor = tensor[ep_rank * rows : (ep_rank + 1) * rows]
        out[name] = tensor
    return out

"""Where GatePro decides: the router module.

The router weight W_g [N, D] is sharded by rows over the EP group, exactly like the experts: the
rank that owns expert e owns row e. Every forward all-gathers the rows (backward reduce-scatters),
computes this rank's fp32 logits from the gathered tensor, and GatePro's pairs from the *same*
tensor, so every rank of the EP group makes the same competition decisions.
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..cluster import faults
from . import comm
from .competition import Competition, compete, partner_co_selected, random_derangement, round_logits
from .routing import (
    TopK,
    check_top_k,
    mixture_weights,
    most_similar_expert,
    routing_margin_counts,
    top_k_experts,
    topk_set_changed,
)


@dataclass(frozen=True)
class Routing:
    """What the router decided for this rank's tokens."""

    logits_TN: torch.Tensor  # fp32 logits at the router's precision, differentiable (aux and z losses use these)
    experts_TK: torch.Tensor  # selected global expert ids
    weights_TK: torch.Tensor  # fp32 mixture weights, differentiable
    # Statistics stay 0-dim long tensors on the logits' device: reading them here would make the
    # host wait for the router at every layer; the trainer reads a step's statistics at once.
    gatepro_penalised: torch.Tensor  # (token, expert) entries that lost to their rival (penalised or masked), this rank
    gatepro_topk_changed: torch.Tensor  # tokens whose selected set differs from plain top-k, this rank
    partner_co_selected: torch.Tensor  # tokens whose set holds an expert and its most similar one, this rank
    margin_counts: torch.Tensor  # routing_margin_counts of this rank's tokens (how close each k-th choice was)


def mark_expert_parallel(param: nn.Parameter) -> nn.Parameter:
    """Tag a parameter as sharded over the EP group (dim 0 = local experts) and reduced over EDP."""
    param.expert_parallel = True
    return param


def is_expert_parallel(param: torch.Tensor) -> bool:
    return getattr(param, "expert_parallel", False)


def seeded_rows(num_rows: int, first_row: int, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """Rows initialised from a per-row generator, so a shard equals the same rows of the full tensor."""
    rows = []
    for global_row in range(first_row, first_row + num_rows):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + global_row)
        rows.append(torch.randn(shape, generator=gen) * std)
    return torch.stack(rows) if rows else torch.empty((0,) + shape)


class GateProRouter(nn.Module):
    """Bias-free linear gate + (optional) GatePro competition + top-k.

    ``gatepro_enabled`` is a plain attribute: flip it at any step (hot swap). With it off, or with
    penalty 0 in penalty mode, the router is exactly plain top-k routing (on logits at its
    precision). ``competition`` says which reading of GatePro runs (``competition.py``).
    ``expert_bias`` is the optional aux-loss-free balancing bias (DeepSeek-V3): it steers
    selection only and is updated by ``update_bias`` outside backward.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        gatepro_enabled: bool = True,
        penalty: float = 1e-4,
        normalize_topk: bool = True,
        bias_enabled: bool = False,
        bias_update_rate: float = 1e-3,
        check_pairs: bool = False,
        init_std: float | None = None,
        ep_group=None,
        mode: str = "penalty",
        pairing: str = "similar",
        space: str = "logits",
        logit_precision: str = "fp32",
    ):
        super().__init__()
        check_top_k(top_k, num_experts)
        self.competition = Competition(mode, pairing, space, penalty, logit_precision)
        ep_size = comm.group_size(ep_group)
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by ep={ep_size}; "
                "choose num_experts as a multiple of the expert-parallel size"
            )
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.gatepro_enabled = gatepro_enabled
        self.normalize_topk, self.check_pairs = normalize_topk, check_pairs
        self.bias_enabled, self.bias_update_rate = bias_enabled, bias_update_rate
        if init_std is not None and not (math.isfinite(init_std) and init_std >= 0):
            raise ValueError(f"init_std={init_std} must be a finite number >= 0 (or None for 1/sqrt(hidden_size))")
        self.init_std = 1.0 / math.sqrt(hidden_size) if init_std is None else float(init_std)
        self.ep_group = ep_group
        self.num_local_experts = num_experts // ep_size
        self.first_expert = comm.group_rank(ep_group) * self.num_local_experts
        self.weight = mark_expert_parallel(
            nn.Parameter(torch.empty(self.num_local_experts, hidden_size))
        )
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # The placebo's fixed rivals (pairing "random"), made by reset_parameters from its seed:
        # not saved (the seed remakes them), moved with the module to its device.
        self.register_buffer("random_rival", None, persistent=False)
        self.reset_parameters(seed=0)

    @property
    def penalty(self) -> float:
        return self.competition.penalty

    @penalty.setter
    def penalty(self, value: float) -> None:
        self.competition = dataclasses.replace(self.competition, penalty=value)

    def reset_parameters(self, seed: int) -> None:
        """Rows ~ N(0, init_std^2), drawn per global row (a shard equals the full tensor's rows).

        ``init_std=0`` makes every row zero: every logit is 0, top-k of the ties picks the lowest
        expert indices for every token, and GatePro's pairing sees no direction (cosines of zero
        rows are 0, so each expert's rival is the lowest other index) and penalises nothing
        (no logit is strictly below its rival's) until the first update separates the rows.
        """
        if self.weight.is_meta:  # shapes only (gatepro-plan): nothing to draw
            return
        with torch.no_grad():
            self.weight.copy_(
                seeded_rows(self.num_local_experts, self.first_expert, (self.hidden_size,), self.init_std, seed)
            )
        if self.competition.pairing == "random":
            self.random_rival = random_derangement(self.num_experts, seed).to(self.expert_bias.device)

    def gathered_weight(self) -> torch.Tensor:
        """The [N, D] weight for this forward: the EP group's rows, all-gathered (differentiable).

        Inside forward only: under ``parallel.dp_shard`` FSDP unshards the weight for forward and
        reshards it after, when ``local_tensor`` is this rank's FSDP shard. Use ``full_weight``
        elsewhere."""
        return comm.all_gather_rows(comm.local_tensor(self.weight), self.ep_group)

    def full_weight(self) -> torch.Tensor:
        """The whole [N, D] router weight, identical on every rank, at any time (statistics, checks).

        A collective: every rank of the world calls it. Under ``parallel.dp_shard`` the weight is a
        DTensor over the (edp, ep) mesh, sharded or not depending on where FSDP is in its step:
        ``full_tensor`` gathers whatever placement it has. Otherwise the EP rows are all-gathered.
        """
        if hasattr(self.weight, "full_tensor"):
            return self.weight.full_tensor()
        return self.gathered_weight()

    def forward(self, x_TD: torch.Tensor) -> Routing:
        if x_TD.shape[-1] != self.hidden_size:
            raise ValueError(
                f"router input has hidden size {x_TD.shape[-1]} but the router expects "
                f"{self.hidden_size}; pass tokens of the model's d_model"
            )
        gate_weight_ND = self.gathered_weight()
        rule = self.competition
        # fp32 on purpose: in bf16, l - 1e-4 == l for |l| > ~0.05 and GatePro would vanish
        # (router.logit_precision emulates exactly that, to measure it).
        with _autocast_off(x_TD.device.type):
            logits_TN = round_logits(faults.skew_logits(x_TD.float() @ gate_weight_ND.float().t()), rule.precision)
        bias_N = self.expert_bias if self.bias_enabled else None
        scores_TN = logits_TN if bias_N is None else logits_TN.detach() + bias_N.float()
        margins = routing_margin_counts(scores_TN, self.top_k, self.penalty)
        # The pairs GatePro names, whether it acts or not (one expert has no partner: GatePro cannot
        # be on then, and no token can hold a pair).
        similar_N = most_similar_expert(gate_weight_ND) if self.num_experts > 1 else None
        plain_experts_TK = top_k_experts(logits_TN, self.top_k, bias_N)

        if not rule.acts(self.gatepro_enabled):
            plain = TopK(plain_experts_TK, mixture_weights(logits_TN, plain_experts_TK, self.normalize_topk))
            none = torch.zeros((), dtype=torch.long, device=logits_TN.device)
            return Routing(logits_TN, plain.experts_TK, plain.weights_TK, none, none,
                           partner_co_selected(plain.experts_TK, similar_N), margins)

        rival_N = similar_N if rule.pairing == "similar" else self.random_rival
        if self.check_pairs:
            assert_same_on_all_ranks(rival_N, self.ep_group)
        decision = compete(logits_TN, rival_N, rule, self.top_k, bias_N, self.normalize_topk)
        chosen = decision.chosen
        return Routing(
            logits_TN,
            chosen.experts_TK,
            chosen.weights_TK,
            decision.losers,
            topk_set_changed(chosen.experts_TK, plain_experts_TK).sum(),
            partner_co_selected(chosen.experts_TK, similar_N),
            margins,
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_N: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

        Call after the optimizer step with counts summed over every rank, so all ranks agree.
        """
        if not self.bias_enabled:
            return
        load_N = tokens_per_expert_N.float().to(self.expert_bias.device)
        self.expert_bias += self.bias_update_rate * torch.sign(load_N.mean() - load_N)


def _autocast_off(device_type: str):
    # A device without autocast (``meta``, which the placement tests use) has nothing to turn off.
    if not torch.amp.is_autocast_available(device_type):
        return nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


class PairsDisagree(RuntimeError):
    pass


def assert_same_on_all_ranks(rival_N: torch.Tensor, group) -> None:
    """Debug check: every rank of the EP group chose identical GatePro pairs."""
    if comm.group_size(group) == 1:
        return
    gathered = comm.all_gather_counts(rival_N.to(torch.long), group)
    if not bool((gathered == gathered[0]).all()):
        bad = [r for r in range(gathered.shape[0]) if not bool((gathered[r] == gathered[0]).all())]
        raise PairsDisagree(
            f"GatePro pairs differ between EP ranks {bad} and rank 0 (global rank "
            f"{dist.get_rank()}); the gathered router weight is not identical on every rank"
        )

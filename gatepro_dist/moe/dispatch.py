"""Where tokens cross ranks: plan, dispatch (permute + all-to-all) and combine (the way back).

One *assignment* is a (token, expert) pair chosen by the router; a token has top_k of them.
The plan is computed once per forward from the routing and consumed by dispatch and combine.
Shapes in names: T tokens, K = top_k, A = T * K assignments, S rows sent (A minus capacity
drops), D hidden size.

Order of assignments on the wire is by global expert id, then by token; destination ranks own
consecutive expert blocks, so "by expert" is also "by destination". Received rows arrive ordered
by (source rank, local expert) and are regrouped to (local expert, source rank) for the experts.
Within an expert, tokens therefore appear in global token order (rank 0's tokens first), which is
exactly what a single process holding the whole batch would see.

Capacity (optional) is computed over the EP group's whole batch, not per rank, so the same tokens
are dropped as in a single process holding every expert:
  * "position": an expert keeps its first C tokens in global token order;
  * "probs":    an expert keeps its C tokens with the highest mixture weight (ties: token order).
Dropping happens at the source, so an expert never receives more than C rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import comm
from .routing import expert_capacity

DROP_POLICIES = ("position", "probs")


@dataclass(frozen=True)
class DispatchPlan:
    send_token_S: torch.Tensor  # token index of each sent row (kept assignments, by expert)
    send_assignment_S: torch.Tensor  # flat index (token * K + slot) of each sent row
    row_of_assignment_A: torch.Tensor  # sent row of each assignment; dropped ones: row S (a zero row)
    input_splits: list[int]  # rows sent to each EP rank
    output_splits: list[int]  # rows received from each EP rank
    recv_to_grouped: torch.Tensor | None  # permutation: received rows -> grouped by local expert
    grouped_to_recv: torch.Tensor | None  # its inverse; both None when rows arrive grouped already
    tokens_per_local_expert: torch.Tensor  # [E_local] rows each local expert computes
    # The same numbers on the host when the split sizes were read anyway (ep > 1 or capacity);
    # None at ep=1 dropless, where nothing is read.
    rows_per_local_expert: list[int] | None
    tokens_per_expert: torch.Tensor  # [N] routed assignments per expert in the EP group, before drops
    # The statistics below are 0-dim long tensors on the device, summed over the EP group: the
    # trainer reads them once per step, not once per layer.
    total_tokens: torch.Tensor  # tokens in the EP group
    dropped_tokens: torch.Tensor  # assignments dropped by capacity in the EP group
    gatepro_penalised: torch.Tensor
    gatepro_topk_changed: torch.Tensor
    partner_co_selected: torch.Tensor

    @property
    def drops_here(self) -> bool:
        """Did capacity drop any of this rank's assignments?"""
        return self.send_assignment_S.numel() < self.row_of_assignment_A.numel()


# What each rank adds to its per-expert counts in the count exchange: its token count and its
# router's three statistics (losers, changed sets, partner co-selections).
HEADER_FIELDS = 4


def count_per_expert(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[N] how many entries of ``expert_A`` name each expert (long, on its device).

    A scatter-add of ones, not ``bincount``: on CUDA bincount reads the maximum back to the host.
    """
    counts_N = torch.zeros(num_experts, dtype=torch.long, device=expert_A.device)
    return counts_N.scatter_add_(0, expert_A, torch.ones_like(expert_A))


def plan_dispatch(
    experts_TK: torch.Tensor,
    weights_TK: torch.Tensor,
    num_experts: int,
    ep_group=None,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
    gatepro_counts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> DispatchPlan:
    """Exchange counts and decide which rows go where. Collective over ``ep_group``.

    Host reads: at most one, the split sizes (``_splits_to_host``; none at ep=1 without capacity,
    where they are known). Everything else stays on the device; the number of tokens of each
    rank, which capacity needs as a Python number (it sizes the "probs" candidate table), is a
    shape, exchanged in host memory (``comm.host_all_gather_ints``) without touching the device.
    """
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} is not one of {DROP_POLICIES}; pick one of them")
    ep_size, ep_rank = comm.group_size(ep_group), comm.group_rank(ep_group)
    num_local = num_experts // ep_size
    num_tokens, top_k = experts_TK.shape
    device = experts_TK.device
    if gatepro_counts is None:
        no_count = torch.zeros((), dtype=torch.long, device=device)
        gatepro_counts = (no_count, no_count, no_count)

    expert_A = experts_TK.reshape(-1)
    tokens_per_expert_local_N = count_per_expert(expert_A, num_experts)
    # One small all-gather tells every rank everything it needs: counts, batch sizes, GatePro stats.
    # (full, not torch.tensor([...], device=...): a fill kernel instead of a host-to-device copy.)
    header_H = torch.stack([
        torch.full((), num_tokens, dtype=torch.long, device=device),
        *(c.to(torch.long).reshape(()) for c in gatepro_counts),
    ])
    gathered_RC = comm.all_gather_counts(torch.cat([tokens_per_expert_local_N, header_H]), ep_group)
    counts_RN = gathered_RC[:, :num_experts]
    header_RH = gathered_RC[:, num_experts:]
    tokens_per_expert_N = counts_RN.sum(0)

    # Stable sort by expert keeps token order inside each expert.
    order_A = torch.sort(expert_A, stable=True).indices
    dropped = torch.zeros((), dtype=torch.long, device=device)
    if capacity_factor is not None:
        tokens_R = [row[0] for row in comm.host_all_gather_ints([num_tokens], ep_group)]
        capacity = expert_capacity(sum(tokens_R), top_k, num_experts, capacity_factor)
        keep_A = _keep_mask(
            order_A, expert_A, weights_TK.detach().reshape(-1), counts_RN, capacity,
            drop_policy, sum(tokens_R[:ep_rank]), top_k, ep_group,
        )
        # Kept assignments first (in sorted order), then the dropped: a stable sort on "dropped"
        # instead of order_A[keep_A], whose size the host would have to read.
        kept_first_A = torch.sort((~keep_A).to(torch.int8), stable=True).indices
        kept_N = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
            0, expert_A[order_A], keep_A.to(torch.long))
        order_A = order_A[kept_first_A]
        dropped = (tokens_per_expert_N - capacity).clamp_min(0).sum()
    else:
        kept_N = tokens_per_expert_local_N

    send_RE = kept_N.view(ep_size, num_local)
    recv_RE = comm.all_to_all_counts(send_RE, ep_group)
    if ep_size == 1 and capacity_factor is None:  # every assignment stays here: known without a read
        input_splits = output_splits = [expert_A.numel()]
        rows_per_local_expert = None
    else:
        input_splits, output_splits, rows_per_local_expert = _splits_to_host(send_RE, recv_RE)
    order_S = order_A[: sum(input_splits)]  # the kept assignments (all of them when dropless)
    # Rows from one source rank, or for one local expert, arrive grouped already.
    recv_to_grouped = (
        _group_by_local_expert(recv_RE, sum(output_splits)) if ep_size > 1 and num_local > 1 else None
    )
    return DispatchPlan(
        send_token_S=order_S // top_k,
        send_assignment_S=order_S,
        row_of_assignment_A=_inverse_permutation(order_S, expert_A.numel()),
        input_splits=input_splits,
        output_splits=output_splits,
        recv_to_grouped=recv_to_grouped,
        grouped_to_recv=None if recv_to_grouped is None else _inverse_permutation(recv_to_grouped),
        tokens_per_local_expert=recv_RE.sum(0),
        rows_per_local_expert=rows_per_local_expert,
        tokens_per_expert=tokens_per_expert_N,
        total_tokens=header_RH[:, 0].sum(),
        dropped_tokens=dropped,
        gatepro_penalised=header_RH[:, 1].sum(),
        gatepro_topk_changed=header_RH[:, 2].sum(),
        partner_co_selected=header_RH[:, 3].sum(),
    )


def _splits_to_host(send_RE: torch.Tensor, recv_RE: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """Rows to send to / receive from each EP rank, and rows per local expert, as Python lists.

    The one inherent host read of a layer's forward: ``all_to_all_single`` takes its split sizes
    as host integers, and the output buffer's size is their sum. One copy for all three (the
    per-expert rows ride along for the expert loop, which needs them on the host too).
    """
    ep_size = send_RE.shape[0]
    host = torch.cat([send_RE.sum(1), recv_RE.sum(1), recv_RE.sum(0)]).tolist()
    return host[:ep_size], host[ep_size:2 * ep_size], host[2 * ep_size:]


def _inverse_permutation(order: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """inverse[order[i]] = i. Positions ``order`` does not reach (dropped assignments) get len(order)."""
    size = order.numel() if size is None else size
    inverse = torch.full((size,), order.numel(), dtype=order.dtype, device=order.device)
    inverse[order] = torch.arange(order.numel(), dtype=order.dtype, device=order.device)
    return inverse


def _group_by_local_expert(recv_RE: torch.Tensor, total: int) -> torch.Tensor:
    """Indices that reorder rows received as (source, expert) blocks into (expert, source) blocks.

    ``total`` (the rows received, known on the host from the split sizes) sizes the output, so
    ``repeat_interleave`` does not read its repeats back.
    """
    ep_size, num_local = recv_RE.shape
    lengths_B = recv_RE.reshape(-1)
    starts_B = torch.cumsum(lengths_B, 0) - lengths_B
    blocks = torch.arange(ep_size * num_local, device=recv_RE.device).view(ep_size, num_local).t().reshape(-1)
    lengths, starts = lengths_B[blocks], starts_B[blocks]
    new_starts = torch.cumsum(lengths, 0) - lengths
    shift = torch.repeat_interleave(starts - new_starts, lengths, output_size=total)
    return torch.arange(total, device=recv_RE.device) + shift


def _keep_mask(order_A, expert_A, weight_A, counts_RN, capacity, policy, first_token, top_k, ep_group):
    """Which sorted assignments survive capacity; decided identically to a single process."""
    ep_rank = comm.group_rank(ep_group)
    sorted_expert = expert_A[order_A]
    num_experts = counts_RN.shape[1]
    local_counts_N = counts_RN[ep_rank]
    # Position of each sorted assignment inside its expert's block (an index, not a repeat: no read).
    first_of_expert_N = torch.cumsum(local_counts_N, 0) - local_counts_N
    rank_in_expert = torch.arange(order_A.numel(), device=order_A.device) - first_of_expert_N[sorted_expert]
    if policy == "position":
        before_me_N = counts_RN[:ep_rank].sum(0)
        return before_me_N[sorted_expert] + rank_in_expert < capacity

    # "probs": find each expert's C-th best (weight desc, global token asc) over the EP group.
    # Every rank contributes only its own best C candidates per expert, so the exchange is small.
    weight = weight_A[order_A]
    gtoken = order_A // top_k + first_token
    # Re-sort inside each expert by (weight desc, token asc): token order is already ascending.
    key_order = torch.sort(-weight, stable=True).indices
    key_order = key_order[torch.sort(sorted_expert[key_order], stable=True).indices]
    # Candidates beyond the C-th of their expert go to a spare last column that is cut off, instead
    # of being filtered out with a boolean mask (whose size the host would have to read).
    cand_w = torch.full((num_experts, capacity + 1), -float("inf"), device=weight.device)
    cand_t = torch.full((num_experts, capacity + 1), torch.iinfo(torch.long).max, device=weight.device)
    rank_sorted = rank_in_expert  # position within expert after re-sort is the same arange trick
    column = rank_sorted.clamp_max(capacity)
    cand_w[sorted_expert, column] = weight[key_order]
    cand_t[sorted_expert, column] = gtoken[key_order]
    cand_w, cand_t = cand_w[:, :capacity].contiguous(), cand_t[:, :capacity].contiguous()
    all_w = comm.all_gather_counts(cand_w, ep_group).permute(1, 0, 2).reshape(num_experts, -1)
    all_t = comm.all_gather_counts(cand_t, ep_group).permute(1, 0, 2).reshape(num_experts, -1)
    by_token = torch.sort(all_t, dim=1, stable=True).indices
    all_w, all_t = all_w.gather(1, by_token), all_t.gather(1, by_token)
    by_weight = torch.sort(-all_w, dim=1, stable=True).indices
    thresh_w = all_w.gather(1, by_weight)[:, capacity - 1]
    thresh_t = all_t.gather(1, by_weight)[:, capacity - 1]
    w_th, t_th = thresh_w[sorted_expert], thresh_t[sorted_expert]
    return (weight > w_th) | ((weight == w_th) & (gtoken <= t_th))


class _PermuteRows(torch.autograd.Function):
    """rows[order] for a permutation ``order``: the backward is the gather grad[inverse].

    Autograd's own backward for indexing scatters into a zero-filled tensor: two passes over the
    rows instead of one, and an accumulating scatter where a gather suffices.
    """

    @staticmethod
    def forward(ctx, rows_MD: torch.Tensor, order_M: torch.Tensor, inverse_M: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse_M)
        return rows_MD.index_select(0, order_M)

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        (inverse_M,) = ctx.saved_tensors
        return grad_MD.index_select(0, inverse_M), None, None


def permute_rows(rows_MD: torch.Tensor, order_M: torch.Tensor | None, inverse_M: torch.Tensor | None) -> torch.Tensor:
    return rows_MD if order_M is None else _PermuteRows.apply(rows_MD, order_M, inverse_M)


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan, ep_group=None) -> torch.Tensor:
    """Rows for the local experts, grouped by local expert: [sum(tokens_per_local_expert), D]."""
    # index_select, not x_TD[...]: its backward is index_add, much cheaper on CPU than index_put.
    send_SD = x_TD.index_select(0, plan.send_token_S)
    recv_RD = comm.all_to_all(send_SD, plan.output_splits, plan.input_splits, ep_group)
    return permute_rows(recv_RD, plan.recv_to_grouped, plan.grouped_to_recv)


def combine(
    y_grouped: torch.Tensor, plan: DispatchPlan, weights_TK: torch.Tensor, num_tokens: int, ep_group=None
) -> torch.Tensor:
    """Send expert outputs back and sum them per token with the mixture weights: [T, D]."""
    recv_RD = permute_rows(y_grouped, plan.grouped_to_recv, plan.recv_to_grouped)
    back_SD = comm.all_to_all(recv_RD, plan.input_splits, plan.output_splits, ep_group)
    if plan.drops_here:  # dropped assignments read an appended zero row
        back_SD = torch.cat([back_SD, back_SD.new_zeros((1, back_SD.shape[1]))])
        back_AD = back_SD.index_select(0, plan.row_of_assignment_A)
    else:  # every assignment has its own row: a permutation
        back_AD = permute_rows(back_SD, plan.row_of_assignment_A, plan.send_assignment_S)
    top_k = weights_TK.shape[1]
    back_TKD = back_AD.view(num_tokens, top_k, back_AD.shape[1])
    # [T, 1, K] @ [T, K, D]: the weighted sum over each token's K expert outputs in one batched GEMM.
    return torch.bmm(weights_TK.unsqueeze(1).to(back_TKD.dtype), back_TKD).squeeze(1)

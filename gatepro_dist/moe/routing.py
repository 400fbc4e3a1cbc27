"""The math of routing, as pure functions of tensors (no modules, no process groups).

GatePro (arXiv 2510.13079) in three lines:
  j*(i) = argmax_{j != i} cos(w_i, w_j)          -- each expert's most similar rival
  l~_i  = l_i - lambda  if l_i < l_{j*(i)}        -- per token, the loser of its pair pays
  top-k on l~, mixture weights = softmax of l~ over the selected k

Shapes in names: T tokens, N experts (global), K = top_k, D hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_PENALTY = 1e-4
# Routing-margin histogram: bin 0 holds margins below 1e-8 (exact ties included), then four bins
# per decade up to 1e2 ([10^(e), 10^(e+1/4)) ...), and the last bin everything from 1e2 up.
MARGIN_DECADES = (-8, 2)
MARGIN_BINS_PER_DECADE = 4
MARGIN_EDGES = (MARGIN_DECADES[1] - MARGIN_DECADES[0]) * MARGIN_BINS_PER_DECADE + 1
MARGIN_FIELDS = 2 + MARGIN_EDGES + 1  # [tokens tied, tokens below the penalty, histogram...]
# Cosines closer than this count as a tie (rows with the same direction differ by rounding only).
SIMILARITY_TIE_TOLERANCE = 1e-9


def most_similar_expert(gate_weight: torch.Tensor) -> torch.Tensor:
    """j*(i) for every expert i: the other expert whose gate row has the highest cosine similarity.

    Ties (within ``SIMILARITY_TIE_TOLERANCE``, computed in fp64) go to the lowest index, so
    rows pointing the same way pair deterministically whatever their rounding. No gradient flows.
    """
    if gate_weight.dim() != 2 or gate_weight.shape[0] < 2:
        raise ValueError(
            f"gate_weight must be 2-D [num_experts >= 2, hidden], got shape {tuple(gate_weight.shape)}; "
            "pass the full (all-gathered) router weight"
        )
    similarity_NN = cosine_similarity_matrix(gate_weight, torch.float64)
    similarity_NN.fill_diagonal_(-math.inf)
    best_N1 = similarity_NN.max(dim=1, keepdim=True).values
    is_best_NN = similarity_NN >= best_N1 - SIMILARITY_TIE_TOLERANCE
    return is_best_NN.to(torch.int8).argmax(dim=1)  # argmax returns the first (lowest) index


def cosine_similarity_matrix(gate_weight: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """S_ij = cos(w_i, w_j), detached (GatePro's pairing is not differentiated)."""
    w_ND = gate_weight.detach().to(dtype)
    unit_ND = w_ND / w_ND.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit_ND @ unit_ND.t()


def gatepro_delta(logits: torch.Tensor, rival: torch.Tensor, penalty: float) -> torch.Tensor:
    """The penalty term delta (fp32, [T, N]): -penalty where l_i < l_{rival(i)} (strict), else 0."""
    logits_TN = logits.detach().float()
    loses_to_rival_TN = logits_TN < logits_TN.index_select(1, rival)
    return loses_to_rival_TN.to(torch.float32) * (-float(penalty))


def gatepro_penalty(
    logits: torch.Tensor, gate_weight: torch.Tensor, penalty: float = DEFAULT_PENALTY
) -> torch.Tensor:
    """GatePro's penalised logits l~ in fp32, same shape as ``logits`` ([tokens, num_experts]).

    The penalty is a constant, so gradients with respect to ``logits`` pass through unchanged.
    """
    check_logits(logits, gate_weight.shape[0] if gate_weight.dim() == 2 else -1)
    check_penalty(penalty)
    rival_N = most_similar_expert(gate_weight)
    return logits.float() + gatepro_delta(logits, rival_N, penalty)


def margin_edges(device) -> torch.Tensor:
    """The histogram's bin edges, made on ``device`` (a kernel, not a copy from the host)."""
    low, high = MARGIN_DECADES
    return torch.logspace(low, high, MARGIN_EDGES, dtype=torch.float64, device=device)


def routing_margin_counts(scores_TN: torch.Tensor, top_k: int, penalty: float) -> torch.Tensor:
    """How close each token's k-th choice came to losing: counts over this call's tokens.

    The margin of a token is s_(k) - s_(k+1), the gap between its k-th and (k+1)-th highest
    selection score (raw logits, plus the balancing bias when that steers selection). GatePro
    moves a logit by at most ``penalty``, so it can change a token's selected set only where
    the margin is below ``penalty``. Returns a long tensor of ``MARGIN_FIELDS`` on the scores'
    device: [tokens with margin exactly 0, tokens with margin < penalty, histogram over
    ``margin_edges``]. Counts add over micro-batches and ranks. With top_k = N there is no
    (k+1)-th expert and every count is 0. Nothing is read back to the host.
    """
    counts = torch.zeros(MARGIN_FIELDS, dtype=torch.long, device=scores_TN.device)
    if top_k >= scores_TN.shape[1] or scores_TN.shape[0] == 0:
        return counts
    top_TK1 = scores_TN.detach().float().topk(top_k + 1, dim=1).values  # the scores selection ranks
    margin_T = top_TK1[:, top_k - 1].double() - top_TK1[:, top_k].double()  # exact: fp32 values in fp64
    counts[0] = (margin_T == 0).sum()
    counts[1] = (margin_T < penalty).sum()
    bins_T = torch.bucketize(margin_T, margin_edges(margin_T.device), right=True)
    counts[2:].scatter_add_(0, bins_T, torch.ones_like(bins_T))
    return counts


def margin_summary(counts: list[int]) -> dict:
    """Host-side summary of ``routing_margin_counts`` (summed over a step's tokens, all ranks).

    Fractions of tokens tied (margin 0) and below the penalty are exact; ``below`` gives the
    exact fraction under each decade 1e-6 .. 1; quantiles p10/p50/p90 are read off the
    histogram (the geometric middle of the bin holding the quantile: within a factor 10^(1/8)
    of the true value; 0 when it falls in the lowest bin, below 1e-8).
    """
    tied, below_penalty, *hist = counts
    tokens = sum(hist)
    if tokens == 0:
        return {}
    low, _ = MARGIN_DECADES
    step = 1.0 / MARGIN_BINS_PER_DECADE

    def quantile(q: float) -> float:
        seen = 0
        for b, c in enumerate(hist):
            seen += c
            if seen >= q * tokens:
                return 0.0 if b == 0 else 10 ** (low + (b - 1 + 0.5) * step)
        return math.inf

    def below(decade: int) -> float:
        return sum(hist[: 1 + (decade - low) * MARGIN_BINS_PER_DECADE]) / tokens

    return {"tokens": tokens, "tied": tied / tokens, "below_penalty": below_penalty / tokens,
            "p10": quantile(0.1), "p50": quantile(0.5), "p90": quantile(0.9),
            "below": {f"1e{d}": below(d) for d in range(-6, 1)}}


def check_logits(logits: torch.Tensor, num_experts: int) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be 2-D [tokens, num_experts], got shape {tuple(logits.shape)}; "
            "flatten batch and sequence dimensions first"
        )
    if logits.shape[1] != num_experts:
        raise ValueError(
            f"logits have {logits.shape[1]} experts but gate_weight has {num_experts} rows; "
            "pass the full (all-gathered) router weight"
        )


def check_penalty(penalty: float) -> None:
    if not math.isfinite(penalty) or penalty < 0:
        raise ValueError(
            f"penalty must be a finite number >= 0, got {penalty}; use the paper's 1e-4 "
            "or 0 for plain top-k"
        )


def check_top_k(top_k: int, num_experts: int) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k={top_k} must be between 1 and num_experts={num_experts}; "
            "lower top_k or add experts"
        )


@dataclass(frozen=True)
class TopK:
    """The selection for each token: K expert ids and their mixture weights."""

    experts_TK: torch.Tensor  # long
    weights_TK: torch.Tensor  # fp32, differentiable


def select_top_k(
    scores_TN: torch.Tensor,
    top_k: int,
    selection_bias_N: torch.Tensor | None = None,
    normalize: bool = True,
) -> TopK:
    """Top-k on ``scores`` (+ an optional bias that steers selection only), then mixture weights.

    ``normalize=True``: softmax over the selected k (GatePro / Mixtral). ``False``: the selected
    entries of the full softmax (OLMoE / Qwen-MoE style, weights do not sum to one).
    Ties in top-k go to the lowest expert index, so selections are reproducible.
    """
    experts_TK = top_k_experts(scores_TN, top_k, selection_bias_N)
    return TopK(experts_TK, mixture_weights(scores_TN, experts_TK, normalize))


def mixture_weights(scores_TN: torch.Tensor, experts_TK: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """The selected experts' weights (fp32, differentiable): the softmax of ``scores`` over the
    selected k (``normalize``), or the selected entries of the softmax over all experts."""
    if normalize:
        return torch.softmax(scores_TN.gather(1, experts_TK), dim=1)
    return torch.softmax(scores_TN, dim=1).gather(1, experts_TK)


def top_k_experts(
    scores_TN: torch.Tensor, top_k: int, selection_bias_N: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``top_k`` highest (scores + bias) per token, best first, ties to the lowest expert index.

    That is a stable descending sort's first k columns, computed as k rounds of argmax (which
    returns the first of equal maxima) that each knock out the winner: O(k N) per token instead
    of a sort (8x faster at N=64, k=2). torch.topk leaves the order of equal scores unspecified.
    Scores are expected finite (a row of -inf could pick a knocked-out expert twice).
    """
    check_top_k(top_k, scores_TN.shape[1])
    if selection_bias_N is None:
        remaining_TN = scores_TN.detach().clone()
    else:
        remaining_TN = scores_TN.detach() + selection_bias_N.float()
    winners = []
    for _ in range(top_k):
        best_T1 = remaining_TN.argmax(dim=1, keepdim=True)
        winners.append(best_T1)
        remaining_TN.scatter_(1, best_T1, -math.inf)
    return torch.cat(winners, dim=1)


def topk_set_changed(experts_a_TK: torch.Tensor, experts_b_TK: torch.Tensor) -> torch.Tensor:
    """Per token: did the *set* of selected experts change? (bool [T])."""
    return (experts_a_TK.sort(dim=1).values != experts_b_TK.sort(dim=1).values).any(dim=1)


def load_balancing_loss(
    logits_TN: torch.Tensor, tokens_per_expert_N: torch.Tensor, total_tokens: int | torch.Tensor, top_k: int
) -> torch.Tensor:
    """Switch-style balance loss  N * sum_i f_i * P_i  as *this rank's share*.

    f_i (fraction of all top-k assignments in the EP group that went to expert i) is global and
    carries no gradient; P_i (mean router probability of expert i) is over this rank's tokens. With
    equal token counts per rank, the mean of the shares over the EP group is the global loss, and
    so is the average of their gradients, which is what data-parallel averaging computes.
    P uses the raw logits (no GatePro penalty, no selection bias): the balance loss sees the
    router as it is, GatePro only changes which experts win.
    """
    num_experts = logits_TN.shape[1]
    assignments = total_tokens * top_k  # a device tensor in the layer (no read), an int in tests
    if isinstance(assignments, torch.Tensor):
        assignments = assignments.clamp_min(1)
    else:
        assignments = max(assignments, 1)
    fraction_N = tokens_per_expert_N.detach().float() / assignments
    mean_prob_N = torch.softmax(logits_TN.float(), dim=1).mean(dim=0)
    return num_experts * (fraction_N * mean_prob_N).sum()


def router_z_loss(logits_TN: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TN.float(), dim=1).square().mean()


def expert_capacity(total_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ceil(capacity_factor * tokens * k / N) over the EP group's batch."""
    return int(math.ceil(capacity_factor * total_tokens * top_k / num_experts))


def gate_similarity_stats(gate_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's diagnostics of S: mean off-diagonal cosine, mean angle, spectral entropy; and
    ``mean_nearest_cos``, each expert's cosine to its most similar other expert (the pair GatePro
    makes compete), averaged over experts.

    Values are 0-dim fp64 tensors on ``gate_weight``'s device, not floats: the caller reads every
    layer's statistics in one batch (``train/step.py``), so no layer waits for the device. Every
    tensor made here is made on that device, and no op reads a value back (no boolean indexing).
    """
    similarity_NN = cosine_similarity_matrix(gate_weight, torch.float64)
    n = similarity_NN.shape[0]
    off_diag_NN = ~torch.eye(n, dtype=torch.bool, device=similarity_NN.device)
    pairs = n * (n - 1)  # off-diagonal entries; 0 for one expert gives NaN means, as before
    angles_NN = torch.rad2deg(torch.arccos(similarity_NN.clamp(-1.0, 1.0)))
    nearest_N = similarity_NN.masked_fill(~off_diag_NN, float("-inf")).amax(dim=1)
    singular = torch.linalg.svdvals(similarity_NN)
    p = singular / singular.sum().clamp_min(1e-30)
    # p log p -> 0 as p -> 0: zero singular values contribute nothing (where, not p[p > 0]: no read).
    p_log_p = torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))
    return {
        "mean_cos": similarity_NN.where(off_diag_NN, 0.0).sum() / pairs,
        "mean_abs_cos": similarity_NN.abs().where(off_diag_NN, 0.0).sum() / pairs,  # the paper's "average cosine"
        "mean_nearest_cos": nearest_N.mean() if n > 1 else similarity_NN.new_full((), float("nan")),
        "mean_angle_deg": angles_NN.where(off_diag_NN, 0.0).sum() / pairs,
        "spectral_entropy": -p_log_p.sum(),
    }

"""GatePro's competition in each reading of the paper, as pure functions of tensors.

The paper's equations: every expert i has a rival j*(i) (its most similar other expert); for a
token, an expert whose score is strictly below its rival's loses and pays a penalty of lambda
before top-k. Its prose says more ("the losing expert is eliminated from consideration"). The
readings, chosen by ``router.gatepro.*`` and ``router.logit_precision`` (defaults first):

- ``mode``: ``penalty`` lowers a loser's score by lambda (the equations); ``mask`` removes losers
  from the token's top-k: every winner ranks before every loser, and losers fill only the slots
  the winners leave (a token with fewer than k winners).
- ``pairing``: ``similar`` is j*(i) = argmax_{j != i} cos(w_i, w_j); ``random`` is a fixed seeded
  derangement of the experts (the placebo: the same strength, no similarity).
- ``space``: ``logits`` compares and penalises the logits; ``probs`` the softmax probabilities
  over all experts ("the competition winner is determined based on the gating probabilities").
- ``precision``: ``fp32`` keeps the logits as computed; ``bf16`` rounds them through bf16 and adds
  the penalty in bf16 arithmetic (a router run in bf16); ``bf16_fp32_penalty`` rounds them and adds
  the penalty in fp32 (bf16 logits meeting an fp32 penalty by PyTorch's type promotion). Emulated
  with fp32 tensors that hold bf16 values, so it runs on any device.

Mixture weights: with ``penalty`` in ``logits`` space, the softmax of the penalised scores over the
selected k (the equations; at fp32 this is exactly the router before these readings existed);
otherwise the router's ordinary weights of the selected experts (the penalty or mask decides
selection only). Shapes in names: T tokens, N experts, K = top_k.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .routing import DEFAULT_PENALTY, TopK, check_penalty, mixture_weights, select_top_k, top_k_experts

MODES = ("penalty", "mask")
PAIRINGS = ("similar", "random")
SPACES = ("logits", "probs")
PRECISIONS = ("fp32", "bf16", "bf16_fp32_penalty")


@dataclass(frozen=True)
class Competition:
    """Which reading of GatePro runs (see the module docstring)."""

    mode: str = "penalty"
    pairing: str = "similar"
    space: str = "logits"
    penalty: float = DEFAULT_PENALTY
    precision: str = "fp32"

    def __post_init__(self):
        for name, value, allowed in (("mode", self.mode, MODES), ("pairing", self.pairing, PAIRINGS),
                                     ("space", self.space, SPACES), ("precision", self.precision, PRECISIONS)):
            if value not in allowed:
                raise ValueError(f"GatePro {name}={value!r} is not one of {allowed}; pick one of them")
        check_penalty(self.penalty)

    def acts(self, enabled: bool) -> bool:
        """Does the competition change anything? (A penalty of 0 does not; a mask needs no lambda.)"""
        return enabled and (self.mode == "mask" or self.penalty > 0)


@dataclass(frozen=True)
class Decision:
    """The selection with the competition, and what it did (0-dim long tensors, on the device)."""

    chosen: TopK
    losers: torch.Tensor  # (token, expert) entries that lost to their rival (penalised or masked)


def round_logits(logits_TN: torch.Tensor, precision: str) -> torch.Tensor:
    """The logits the router works with: as computed (fp32), or rounded through bf16 (held in fp32,
    differentiable: the gradient passes through the rounding unchanged)."""
    if precision == "fp32":
        return logits_TN
    return logits_TN.to(torch.bfloat16).to(logits_TN.dtype)


def random_derangement(num_experts: int, seed: int) -> torch.Tensor:
    """A seeded permutation of range(num_experts) with no fixed point: expert i's placebo rival.

    Uniform over derangements (a shuffle drawn until none is fixed: e^-1 of draws succeed).
    The same ``seed`` gives the same pairs on every rank; on the CPU (a buffer of the router moves
    it to the device once)."""
    if num_experts < 2:
        raise ValueError(f"random pairing needs at least 2 experts, got {num_experts}; use moe.num_experts >= 2")
    # Drawn in Python, not with tensor ops: the values are checked for fixed points, which a model
    # built under a default device or a fake tensor mode could not read.
    rng, perm = random.Random(seed), list(range(num_experts))
    while True:
        rng.shuffle(perm)
        if all(rival != expert for expert, rival in enumerate(perm)):
            return torch.tensor(perm, dtype=torch.long, device="cpu")


def loses_to_rival(scores_TN: torch.Tensor, rival_N: torch.Tensor) -> torch.Tensor:
    """[T, N] bool: score of expert i strictly below its rival's (a tie loses nothing)."""
    return scores_TN < scores_TN.index_select(1, rival_N)


def winners_first_top_k(key_TN: torch.Tensor, demoted_TN: torch.Tensor, top_k: int) -> torch.Tensor:
    """Per token, the ``top_k`` experts by ``key``, every non-demoted expert ranked before every
    demoted one; within a tier best first, ties to the lowest index (as ``top_k_experts``)."""
    order_TN = torch.sort(key_TN, dim=1, descending=True, stable=True).indices
    tier_TN = demoted_TN.gather(1, order_TN).to(torch.int8)
    return order_TN.gather(1, torch.sort(tier_TN, dim=1, stable=True).indices[:, :top_k])


def compete(logits_TN: torch.Tensor, rival_N: torch.Tensor, rule: Competition, top_k: int,
            selection_bias_N: torch.Tensor | None = None, normalize: bool = True) -> Decision:
    """Select ``top_k`` experts per token under ``rule``. ``logits_TN`` are fp32 and already at the
    rule's precision (``round_logits``); the bias steers selection only, as in ``select_top_k``."""
    if rule.space == "probs" and selection_bias_N is not None:
        raise ValueError("GatePro in probability space with a selection bias is not supported; "
                         "set router.gatepro.space=logits or router.bias.enabled=false")
    in_bf16 = rule.precision == "bf16"
    if rule.space == "logits":
        scores_TN = logits_TN.detach()
    else:
        scores_TN = torch.softmax(logits_TN.detach().float(), dim=1)
        if in_bf16:
            scores_TN = scores_TN.to(torch.bfloat16).float()
    losers_TN = loses_to_rival(scores_TN, rival_N)

    if rule.mode == "mask":
        key_TN = scores_TN if selection_bias_N is None else scores_TN + selection_bias_N.float()
        experts_TK = winners_first_top_k(key_TN, losers_TN, top_k)
        chosen = TopK(experts_TK, mixture_weights(logits_TN, experts_TK, normalize))
    elif rule.space == "logits":  # at fp32: the router before the readings, operation for operation
        chosen = select_top_k(_penalise(logits_TN, losers_TN, rule.penalty, in_bf16), top_k,
                              selection_bias_N, normalize)
    else:
        experts_TK = top_k_experts(_penalise(scores_TN, losers_TN, rule.penalty, in_bf16), top_k)
        chosen = TopK(experts_TK, mixture_weights(logits_TN, experts_TK, normalize))
    return Decision(chosen, torch.count_nonzero(losers_TN))


def _penalise(values_TN: torch.Tensor, losers_TN: torch.Tensor, penalty: float, in_bf16: bool) -> torch.Tensor:
    """``values - penalty`` at the losers: in fp32, or rounded to bf16 as a bf16 tensor's sum is."""
    if in_bf16:
        return (values_TN.to(torch.bfloat16) + losers_TN.to(torch.bfloat16) * -penalty).to(values_TN.dtype)
    return values_TN + losers_TN.to(torch.float32) * (-float(penalty))


def partner_co_selected(experts_TK: torch.Tensor, partner_N: torch.Tensor | None) -> torch.Tensor:
    """0-dim long: tokens whose selected set holds some expert together with its partner
    (``partner_N[i]``, e.g. its most similar expert): the redundancy GatePro is said to prevent.
    ``None`` (a layer of one expert, which has no partner): 0."""
    if partner_N is None:
        return torch.zeros((), dtype=torch.long, device=experts_TK.device)
    selected_TN = torch.zeros(experts_TK.shape[0], partner_N.numel(), dtype=torch.bool, device=experts_TK.device)
    selected_TN.scatter_(1, experts_TK, True)
    return (selected_TN & selected_TN.index_select(1, partner_N)).any(dim=1).sum()

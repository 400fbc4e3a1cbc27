"""Communication cost model: the bytes one rank sends per MoE layer per forward+backward.

Everything except the token all-to-all follows from the configuration alone. The token
all-to-all depends on where the router sends tokens; ``expected_remote_rows`` gives the value
under uniform routing, and the exact value follows from the rows that actually crossed ranks
(``MoEStats.rows_sent`` / ``rows_received``).
"""
from __future__ import annotations

from dataclasses import dataclass

from .comm import GLOO_HAS_REDUCE_SCATTER
from .dispatch import HEADER_FIELDS

FP32, BF16, INT64 = 4, 2, 8
ACTIVATION_BYTES = {"fp32": FP32, "bf16": BF16}  # by train.dtype: what the token all-to-all carries


@dataclass(frozen=True)
class LayerComm:
    num_experts: int
    hidden_size: int
    top_k: int
    ep: int
    tokens_per_rank: int
    backend: str = "gloo"  # nccl and gloo >= torch 2.13 reduce the router gradient with a reduce-scatter
    activation_bytes: int = FP32  # BF16 under train.dtype=bf16; the router's weight and gradient stay fp32
    capacity: int | None = None  # per-expert capacity with drop_policy "probs" (extra candidate exchange)

    def expected_remote_rows(self) -> float:
        """Rows sent to other ranks if every expert is equally likely: T * k * (ep - 1) / ep."""
        return self.tokens_per_rank * self.top_k * (self.ep - 1) / self.ep

    def bytes_by_kind(self, rows_sent: float | None = None, rows_received: float | None = None) -> dict[str, int]:
        n, d, ep = self.num_experts, self.hidden_size, self.ep
        if ep == 1:
            return {}
        sent = self.expected_remote_rows() if rows_sent is None else rows_sent
        received = self.expected_remote_rows() if rows_received is None else rows_received
        router = n * d * FP32
        grad_factor = 2 if self.backend == "gloo" and not GLOO_HAS_REDUCE_SCATTER else 1  # see comm.py
        counts = (n + HEADER_FIELDS) * INT64 * (ep - 1) + (n // ep) * INT64 * (ep - 1)
        if self.capacity is not None:
            counts += n * self.capacity * (FP32 + INT64) * (ep - 1) + INT64 * (ep - 1)  # + tokens per rank
        return {
            "router_all_gather": router // ep * (ep - 1),
            "router_grad_reduce": grad_factor * router * (ep - 1) // ep,
            "counts": counts,
            # dispatch and combine, forward and backward: rows out + rows back in each direction
            "token_all_to_all": int(2 * (sent + received) * d * self.activation_bytes),
        }

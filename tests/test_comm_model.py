"""The communication model predicts exactly the bytes the layer's collectives move."""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from gatepro_dist.experiments.bench import comm as comm_bench
from gatepro_dist.experiments.bench.comm import measure
from gatepro_dist.moe.comm_model import BF16, FP32, LayerComm
from gatepro_dist.moe.router import GateProRouter

EXPERTS, HIDDEN, TOP_K, TOKENS = 8, 16, 2, 64


def _measure_and_record_choices(rank: int, world: int, args: dict) -> dict:
    """The comm benchmark's measurement, plus the experts the router chose for this rank's tokens
    (a global forward hook: the benchmark builds its layer itself)."""
    chosen = []

    def record(module, inputs, routing):
        if isinstance(module, GateProRouter):
            chosen.append(routing.experts_TK.detach().clone())

    with torch.nn.modules.module.register_module_forward_hook(record):
        result = comm_bench._measure(rank, world, args)
    (experts_TK,) = chosen
    return {**result, "experts_TK": experts_TK}


@pytest.mark.parametrize("ep", [2, 4])
def test_predicted_bytes_equal_counted_bytes(ep):
    args = dict(experts=EXPERTS, hidden=HIDDEN, top_k=TOP_K, tokens=TOKENS, ffn=8, dtype="fp32")
    results = run_on_ranks(ep, _measure_and_record_choices, args)
    # rows_SD[s, d]: (token, expert) choices of rank s whose expert lives on rank d (experts in
    # consecutive blocks of EXPERTS // ep), counted from the router's choices alone.
    rows_SD = torch.stack([
        torch.bincount(r["experts_TK"].reshape(-1) // (EXPERTS // ep), minlength=ep) for r in results])
    assert rows_SD.sum() == ep * TOKENS * TOP_K
    for rank, r in enumerate(results):
        sent = int(rows_SD[rank].sum() - rows_SD[rank, rank])  # to the other ranks' experts
        received = int(rows_SD[:, rank].sum() - rows_SD[rank, rank])  # from the other ranks' tokens
        assert sent > 0 and received > 0
        # dispatch and combine, forward and backward: each crossing row goes out and comes back
        # twice, HIDDEN fp32 values each
        assert r["counted"]["token_all_to_all"] == 2 * (sent + received) * HIDDEN * FP32, rank
        model = LayerComm(EXPERTS, HIDDEN, TOP_K, ep, TOKENS)
        assert r["counted"] == model.bytes_by_kind(sent, received) == r["exact"], rank


def test_uniform_prediction_is_the_expected_remote_share():
    model = LayerComm(num_experts=16, hidden_size=512, top_k=2, ep=4, tokens_per_rank=8192)
    assert model.expected_remote_rows() == 8192 * 2 * 3 / 4
    assert model.bytes_by_kind()["router_all_gather"] == 16 * 512 * 4 * 3 // 4
    assert LayerComm(16, 512, 2, 1, 8192).bytes_by_kind() == {}


# The comm benchmark's command line (the same measure() at ep=2, in a subprocess) is checked once, through
# gatepro-bench, in tests/test_bench.py::test_comm_benchmark_through_gatepro_bench_counts_what_the_model_predicts.


def test_bf16_tokens_cross_ranks_in_half_the_bytes_of_fp32():
    """Under train.dtype=bf16 the all-to-all carries bf16 rows; routing (fp32) and everything else are unchanged."""
    fp32 = measure(2, experts=8, hidden=16, top_k=2, tokens=64, ffn=8)
    bf16 = measure(2, experts=8, hidden=16, top_k=2, tokens=64, ffn=8, dtype="bf16")
    for r32, r16 in zip(fp32, bf16):
        assert r16["counted"] == r16["exact"]  # the model with activation_bytes=2 predicts the counted bytes
        assert r16["counted"]["token_all_to_all"] * 2 == r32["counted"]["token_all_to_all"] > 0
        assert {k: v for k, v in r16["counted"].items() if k != "token_all_to_all"} == \
               {k: v for k, v in r32["counted"].items() if k != "token_all_to_all"}
    model = LayerComm(num_experts=16, hidden_size=512, top_k=2, ep=4, tokens_per_rank=8192)
    half = LayerComm(num_experts=16, hidden_size=512, top_k=2, ep=4, tokens_per_rank=8192, activation_bytes=BF16)
    assert half.bytes_by_kind()["token_all_to_all"] * 2 == model.bytes_by_kind()["token_all_to_all"]

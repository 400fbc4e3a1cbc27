"""The routing-margin statistic and router.init_std (issue: when does GatePro act?).

The margin of a token is the gap between its k-th and (k+1)-th selection score: GatePro moves a
logit by at most its penalty, so only tokens with a margin below the penalty can change their
expert set. The counts are checked against a plain per-token loop over sorted scores.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from gatepro_dist.config import ConfigError
from gatepro_dist.moe.router import GateProRouter
from gatepro_dist.moe.routing import (MARGIN_BINS_PER_DECADE, MARGIN_DECADES, MARGIN_FIELDS, margin_summary,
                                      most_similar_expert, routing_margin_counts)
from test_trainer import run_training, tiny_config


def _loop_counts(scores_TN: torch.Tensor, top_k: int, penalty: float) -> list[int]:
    """The same counts, one token at a time, with the bin found by comparing against each edge."""
    low, high = MARGIN_DECADES
    edges = [10.0 ** (low + j / MARGIN_BINS_PER_DECADE) for j in range((high - low) * MARGIN_BINS_PER_DECADE + 1)]
    counts = [0] * MARGIN_FIELDS
    for row in scores_TN.tolist():
        ordered = sorted(row, reverse=True)
        margin = ordered[top_k - 1] - ordered[top_k]
        counts[0] += margin == 0
        counts[1] += margin < penalty
        counts[2 + sum(margin >= e for e in edges)] += 1
    return counts


def test_margin_counts_equal_a_per_token_loop():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(500, 16, generator=gen)  # fp32, as the router's logits
    scores[:50, 5] = scores[:50, 9]  # exact ties, some of them at the k-th place
    scores[50:100] *= 1e-5  # tiny gaps, below the penalty
    scores[100:110] = 0.0  # every score tied (a zero-initialised router)
    scores[110:120] *= 1e4  # gaps in the top bin
    for top_k, penalty in [(1, 1e-4), (2, 1e-4), (6, 1e-2), (15, 0.0)]:
        counts = routing_margin_counts(scores, top_k, penalty).tolist()
        assert counts == _loop_counts(scores, top_k, penalty), (top_k, penalty)
        assert sum(counts[2:]) == 500
    assert routing_margin_counts(scores, 2, 1e-4)[0] >= 10  # the tied rows were seen as tied


def test_margin_is_undefined_with_every_expert_selected():
    assert routing_margin_counts(torch.randn(7, 4), 4, 1e-4).tolist() == [0] * MARGIN_FIELDS
    assert margin_summary([0] * MARGIN_FIELDS) == {}


def test_margin_summary_fractions_and_quantiles():
    low, _ = MARGIN_DECADES
    counts = [0] * MARGIN_FIELDS
    counts[0], counts[1] = 10, 30  # 10 tied, 30 below the penalty
    counts[2] = 10  # the tied ones, below 1e-8
    bin_of = lambda margin: 2 + 1 + math.floor((math.log10(margin) - low) * MARGIN_BINS_PER_DECADE)  # noqa: E731
    counts[bin_of(3e-5)] += 20
    counts[bin_of(0.2)] += 70
    summary = margin_summary(counts)
    assert summary["tokens"] == 100 and summary["tied"] == 0.1 and summary["below_penalty"] == 0.3
    assert summary["below"]["1e-4"] == 0.3 and summary["below"]["1e-1"] == 0.3 and summary["below"]["1e0"] == 1.0
    assert summary["p10"] == 0.0  # the lowest bin
    assert 0.2 / 10 ** (1 / 8) <= summary["p50"] <= 0.2 * 10 ** (1 / 4)


def test_router_reports_the_margins_of_its_selection_scores():
    router = GateProRouter(8, 16, 2, penalty=1e-3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    routing = router(x)
    assert routing.margin_counts.tolist() == _loop_counts(routing.logits_TN.detach(), 2, 1e-3)
    router.bias_enabled = True  # with the balancing bias on, selection ranks logits + bias
    router.expert_bias.copy_(torch.linspace(-1, 1, 16))
    biased = router(x)
    expected = _loop_counts(biased.logits_TN.detach() + router.expert_bias, 2, 1e-3)
    assert biased.margin_counts.tolist() == expected != routing.margin_counts.tolist()


def test_init_std_zero_makes_every_logit_tie_and_gatepro_a_no_op_at_the_start():
    router = GateProRouter(8, 16, 2, penalty=1e-4, init_std=0.0)
    assert torch.count_nonzero(router.weight) == 0
    # Zero rows have no direction: every cosine is 0, so each expert's rival is the lowest other index.
    assert most_similar_expert(router.weight).tolist() == [1] + [0] * 15
    routing = router(torch.randn(32, 8))
    assert routing.gatepro_penalised.item() == 0 and routing.gatepro_topk_changed.item() == 0
    assert routing.experts_TK.tolist() == [[0, 1]] * 32  # ties go to the lowest indices
    assert routing.margin_counts[0].item() == 32  # every token tied


def test_init_std_scales_the_rows_and_the_default_is_one_over_sqrt_d():
    default = GateProRouter(64, 128, 6)
    small = GateProRouter(64, 128, 6, init_std=1e-3)
    assert default.init_std == 1 / 8 and abs(default.weight.std().item() - 1 / 8) < 0.01
    assert torch.allclose(small.weight, default.weight * (1e-3 * 8))  # same draws, scaled


def test_init_std_is_validated_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"router.init_std=-0.1 must be >= 0"):
        tiny_config(tmp_path, "router.init_std=-0.1")
    assert tiny_config(tmp_path, "router.init_std=0").router.init_std == 0.0


@pytest.mark.slow
def test_metrics_carry_the_margin_of_every_token_of_the_step(tmp_path):
    """Over two ranks the counts are summed over the world once per step, inside the step's
    existing all-reduce: every token of the global batch is counted once per layer."""
    run_training(2, tmp_path / "run", "train.steps=2", "parallel.ep=2", "router.init_std=0")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "moe" in r]
    cfg = tiny_config(tmp_path, world_size=2)
    for record in steps:
        for layer in record["moe"]:
            assert layer["routing_margin"]["tokens"] == cfg.train.global_batch_size * cfg.data.seq_len
    assert steps[0]["moe"][0]["routing_margin"]["tied"] == 1.0  # a zero router ties every token at step 1
    assert steps[1]["moe"][0]["routing_margin"]["tied"] < 1.0  # and the first update separated them
    from gatepro_dist.experiments.sweep_report import summarize_run
    from gatepro_dist.train.report import summarize

    summary = summarize_run(records)
    assert summary["first_below_penalty"] == 1.0 > summary["final_below_penalty"]  # tied tokens: margin 0
    assert summarize(records).final_margin[0] == steps[-1]["moe"][0]["routing_margin"]

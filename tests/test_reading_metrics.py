"""The statistics the readings of GatePro are judged by: partner co-selection, the share of sets a
reading changed, the batch-size-invariant dead-expert count and the mean |cos|; from the layer
(against loops over the layer's own decisions) to metrics.jsonl, the run report and the sweep summary."""
from __future__ import annotations

import json

import pytest
import torch

from gatepro_dist.experiments.sweep_report import summarize_run
from gatepro_dist.moe.layer import MoELayer, MoESpec
from gatepro_dist.moe.routing import gate_similarity_stats, most_similar_expert, top_k_experts
from gatepro_dist.train.readout import LayerNumbers, LogWindow, StepReadout, dead_experts
from gatepro_dist.train.report import summarize, write_report
from test_trainer import run_training


def test_dead_experts_are_those_below_a_tenth_of_an_even_share():
    assert dead_experts([[10, 0, 90]]) == 1  # shares 0.1, 0, 0.9 against 0.1/3
    assert dead_experts([[1, 19]]) == 0  # a share of exactly 0.1/N = 0.05 is alive
    assert dead_experts([[1, 20]]) == 1  # 1/21 < 0.05
    assert dead_experts([[3, 0], [0, 3]]) == 0  # summed over the steps: the batch size does not matter
    assert dead_experts([[0, 0, 0]]) == 3  # nothing assigned: nothing alive
    # the same shares at a 1000x larger batch give the same count; the zero-token count does not
    small, large = [[0, 1, 5, 30, 64]], [[2, 998, 5000, 30000, 64000]]
    assert dead_experts(small) == dead_experts(large) == 2


def _readout(counts: list[int]) -> StepReadout:
    numbers = LayerNumbers(counts=counts, aux_loss=0.0, z_loss=0.0, dropped=0, penalised=0, changed=0,
                           assignments=sum(counts), co_selected=1, tokens=sum(counts), rows_max=0,
                           margin=[0, 0, sum(counts)])
    return StepReadout(loss=1.0, grad_norm=1.0, finite=True, layers=[numbers])


def test_the_metrics_line_counts_dead_experts_over_the_last_ten_steps_whatever_log_every():
    window = LogWindow(log_every=4)
    lines = []
    for step in range(1, 13):  # expert 0 gets tokens in steps 1 and 2 only
        window.add(_readout([50 if step <= 2 else 0, 50, 50, 50]), tokens=150.0, seconds=1.0)
        if window.due(step, 12):
            lines.append(window.record(step, lr=1e-3, gatepro_on=True))
    assert [line["step"] for line in lines] == [4, 8, 12]
    # steps 1-4: 100 of 700 for expert 0 (alive); 1-8: 100 of 1300 (alive, 0.077 > 0.025);
    # 3-12 (the last ten): 0 of 1500 -> dead
    assert [line["moe"][0]["dead_experts"] for line in lines] == [0, 0, 1]
    assert [line["moe"][0]["partner_co_selection"] for line in lines] == [4 / 700, 4 / 600, 4 / 600]


@pytest.mark.parametrize("reading", [dict(), dict(gatepro_mode="mask"),
                                     dict(gatepro_mode="mask", gatepro_pairing="random"),
                                     dict(gatepro_space="probs", logit_precision="bf16_fp32_penalty"),
                                     dict(gatepro=False)])
def test_the_layer_counts_partner_co_selection_and_changed_sets_as_loops_over_its_decisions(reading):
    spec = MoESpec(hidden_size=16, num_experts=8, top_k=3, expert_ffn_dim=8, penalty=0.2, **reading)
    layer = MoELayer(spec)
    layer.router.reset_parameters(seed=3)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(4))
    routing = layer.router(x)
    _, stats = layer(x)
    weight = layer.router.weight.detach()
    partner = most_similar_expert(weight).tolist()
    chosen = routing.experts_TK.tolist()
    plain = top_k_experts(x @ weight.t(), 3).tolist()
    co = sum(any(partner[e] in row for e in row) for row in chosen)
    changed = sum(set(a) != set(b) for a, b in zip(chosen, plain))
    assert int(stats.partner_co_selected) == co and 0 < co < 200
    assert int(stats.gatepro_topk_changed) == changed
    assert (changed > 0) == spec.gatepro  # every reading here changes some sets at this strength


def test_mean_abs_cos_is_the_mean_absolute_off_diagonal_cosine():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    stats = gate_similarity_stats(weight)
    cosines = [0.0, -2 ** -0.5, 0.0, 2 ** -0.5, -2 ** -0.5, 2 ** -0.5]  # (0,1) (0,2) (1,0) (1,2) (2,0) (2,1)
    assert float(stats["mean_abs_cos"]) == pytest.approx(sum(abs(c) for c in cosines) / 6, abs=1e-12)
    assert float(stats["mean_cos"]) == pytest.approx(0.0, abs=1e-12)


def test_a_run_logs_the_reading_metrics_and_its_report_and_sweep_summary_show_them(tmp_path):
    run_training(1, tmp_path / "run", "train.steps=3", "train.stats_every=1", "router.gatepro.mode=mask",
                 "router.gatepro.pairing=random")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        for layer in record["moe"]:
            assert 0.0 <= layer["partner_co_selection"] <= 1.0
            assert 0 <= layer["dead_experts"] <= 8
            assert 0.0 <= layer["similarity"]["mean_abs_cos"] <= 1.0
            assert layer["similarity"]["mean_abs_cos"] >= abs(layer["similarity"]["mean_cos"])
    assert any(layer["gatepro_topk_changed"] > 0 for record in records for layer in record["moe"])
    summary = summarize(records)
    assert summary.final_dead_experts == {i: layer["dead_experts"] for i, layer in enumerate(records[-1]["moe"])}
    assert summary.partner_co_selection[0] == pytest.approx(
        sum(r["moe"][0]["partner_co_selection"] for r in records) / 3)
    row = summarize_run(records)
    assert row["final_dead_experts"] == sum(l["dead_experts"] for l in records[-1]["moe"]) / 2
    assert row["final_mean_abs_cos"] == pytest.approx(
        sum(l["similarity"]["mean_abs_cos"] for l in records[-1]["moe"]) / 2)
    report = write_report(tmp_path / "run").read_text()
    assert "dead experts, last step" in report and "most similar partner" in report

"""A router forced to send every token to one expert (GATEPRO_FAULT=hot_expert, gatepro_dist/
faults.py) for many steps at ep=2 on real gloo groups: no hang and no NaN, dropless or with a
capacity; with a capacity no expert ever computes more rows than the capacity (so memory stays
bounded however skewed the routing), and the drop rate is reported exactly."""
from __future__ import annotations

import json
import math

import pytest

from gatepro_dist.routing import expert_capacity
from test_trainer import run_training

STEPS, TOKENS, TOP_K, EXPERTS = 30, 8 * 32, 2, 8  # TINY: 8 sequences of 32 tokens, 8 experts, top-2


@pytest.mark.slow
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_every_token_on_one_expert_for_many_steps(tmp_path, monkeypatch, capacity_factor):
    monkeypatch.setenv("GATEPRO_FAULT", "hot_expert:expert=0")  # inherited by the spawned ranks
    run = tmp_path / "run"
    capacity = "null" if capacity_factor is None else capacity_factor
    losses = run_training(2, run, f"train.steps={STEPS}", "parallel.ep=2", f"moe.capacity_factor={capacity}")
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cap = expert_capacity(TOKENS, TOP_K, EXPERTS, capacity_factor) if capacity_factor else None
    for record in records:
        assert not record.get("skipped")
        for layer in record["moe"]:
            counts = layer["tokens_per_expert"]
            assert counts[0] == TOKENS and sum(counts) == TOKENS * TOP_K  # every token chose expert 0
            if cap is None:
                assert layer["dropped_tokens"] == 0 and layer["drop_rate"] == 0
                assert layer["expert_rows_max"] == TOKENS
            else:
                dropped = sum(max(0, c - cap) for c in counts)
                assert layer["dropped_tokens"] == dropped >= TOKENS - cap
                assert layer["drop_rate"] == dropped / (TOKENS * TOP_K)
                assert layer["expert_rows_max"] == cap  # the bound on what one expert computes

"""A router forced to send every token to one expert (GATEPRO_FAULT=hot_expert, gatepro_dist/
faults.py) for many steps at ep=2 on real gloo groups: no hang and no NaN, dropless or with a
capacity; with a capacity no expert ever computes more rows than the capacity (so memory stays
bounded however skewed the routing), and the drop rate is reported exactly."""
from __future__ import annotations

import json
import math

import pytest

from gatepro_dist.moe.routing import expert_capacity
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


def test_the_extremes_benchmark_runs_end_to_end_on_tiny_settings():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "gatepro_dist.experiments.bench.cli", "extremes", "--tokens", "256", "--hidden", "32",
                           "--ffn", "32", "--experts", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert len(rows) == 8  # (balanced, one hot) x (dropless, capacity 1.0) x 2 ranks
    capacity = expert_capacity(2 * 256, TOP_K, EXPERTS, 1.0)
    hot_capped = [r for r in rows if r[:3] == ["one", "hot", "1.0"]]
    hot_rank, other_rank = (int(r[5]) for r in hot_capped)  # "most rows/expert" of ranks 0 and 1
    assert hot_rank == capacity and other_rank <= capacity

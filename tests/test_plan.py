"""gatepro-plan: what one rank holds, predicted on the meta device under a fake process group,
against what real gloo ranks hold; activations against autograd's own count; the CLI and the
table in docs/scaling.md."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distributed import run_on_ranks
from gatepro_dist.cli.plan import main, markdown
from gatepro_dist.config import load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.experiments.bench.checkpointing import saved_activation_bytes
from gatepro_dist.train.model import Transformer
from gatepro_dist.train.plan import (activation_bytes, backward_working_bytes, cast_weight_bytes, peak_bytes, state_bytes,
                                    tokens_per_micro_batch)
from gatepro_dist.train.step import autocast
from test_dp_shard import FSDP, _gradients_and_bytes
from test_trainer import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("layout", [["parallel.ep=2"], ["parallel.ep=2", FSDP],
                                    ["parallel.ep=2", FSDP, "moe.num_experts=6"]], ids=["replicated", "fsdp", "fsdp-dim1"])
def test_planned_bytes_equal_what_each_real_rank_holds_at_world_4(layout):
    """Weights, gradients and both AdamW moments (4 x the weights), dense and expert apart, rank
    by rank, exactly: the fake-world shards are the real ones, FSDP's padding and dimension
    choice included."""
    measured = run_on_ranks(4, _gradients_and_bytes, layout)
    cfg = tiny_config("/tmp/unused", *layout, world_size=4)
    for rank, held in enumerate(measured):
        planned = state_bytes(cfg, 4, rank)
        assert (4 * planned.dense, 4 * planned.expert) == (held["dense_bytes"], held["expert_bytes"]), rank
    if FSDP in layout:  # one quarter of the dense state per rank (FSDP's row padding aside); experts: half
        replicated = state_bytes(tiny_config("/tmp/unused", *[o for o in layout if o != FSDP], world_size=4), 4)
        planned = state_bytes(cfg, 4, 0)
        assert abs(planned.dense - replicated.dense / 4) <= 0.05 * replicated.dense / 4
        assert planned.expert * 2 == replicated.expert


SHAPES = {
    "moe": ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "moe.num_experts=8",
            "moe.top_k=2", "moe.expert_ffn_dim=48", "model.vocab_size=300"],
    "dense+shared+qk_norm": ["model.d_model=64", "model.n_layers=3", "model.first_dense_layers=1", "model.n_heads=4",
                             "model.n_kv_heads=4", "moe.num_experts=16", "moe.top_k=4", "moe.expert_ffn_dim=32",
                             "moe.num_shared_experts=1", "model.qk_norm=true", "model.dense_ffn_dim=96"],
}


@pytest.mark.parametrize("shape,dtype,mode", list(itertools.product(SHAPES, ["fp32", "bf16"], ["none", "moe", "block"])))
def test_planned_activations_are_within_5_percent_of_what_autograd_keeps(shape, dtype, mode):
    cfg = validate(load_config(str(ROOT / "configs/quickstart.yaml"), SHAPES[shape] + [
        "parallel.ep=1", f"train.dtype={dtype}", f"train.activation_checkpointing={mode}", "data.seq_len=32",
        "model.max_seq_len=32", "train.global_batch_size=4"]), 1)
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    def loss():
        with autocast(cfg, torch.device("cpu")):
            logits, stats = model(tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()) + sum(s.loss for s in stats)

    measured, _ = saved_activation_bytes(model, loss)
    planned = activation_bytes(cfg, 4 * 32, mode) + cast_weight_bytes(cfg, mode)
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


@pytest.mark.parametrize("batch,crowded", [(256, "start of backward"), (1, "end of backward")])
def test_the_planned_peak_is_the_larger_crowded_moment_of_a_step(batch, crowded):
    """Many tokens: every activation is alive as backward starts, before any weight gradient;
    one sequence: the gradients and their buckets outweigh the activations. The peak is the
    larger moment, not the sum of both."""
    cfg = validate(load_config(str(ROOT / "configs/quickstart.yaml"), ["parallel.ep=1", f"train.global_batch_size={batch}"]), 1)
    state, tokens = state_bytes(cfg, 1), tokens_per_micro_batch(cfg, 1)
    start = (activation_bytes(cfg, tokens, "none") + backward_working_bytes(cfg, tokens, "none")
             + tokens * cfg.model.vocab_size * 8)
    end = 2 * state.grads
    assert (start > end) == (crowded == "start of backward")
    assert peak_bytes(cfg, 1, state, "none") == state.params + state.optimizer + max(start, end)


def test_gatepro_plan_says_what_fits(capsys):
    mixtral = str(ROOT / "configs/plans/mixtral_8x7b.yaml")
    assert main([mixtral, "--world", "1024", "--gpu-mem", "80", "train.grad_accum=1"]) == 0
    out = capsys.readouterr().out
    assert "46.70 B parameters (45.10 B in experts)" in out
    assert "world 1024 (FSDP (parallel.dp_shard), ep=8, edp=128)" in out
    weights = next(line for line in out.splitlines() if line.startswith("  weights, fp32"))
    assert float(weights.split()[-1]) == pytest.approx(46.70e9 * 4 / 1024 / 2**30, rel=0.01)
    assert "fsdp_all_gather" in out and "token_all_to_all" in out
    assert main([mixtral, "--world", "64", "--gpu-mem", "80", "parallel.dp_shard=false"]) == 0
    peaks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("peak")]
    assert len(peaks) == 3 and all(line.endswith("does not fit") for line in peaks)


@pytest.mark.parametrize("argv,message", [
    ([str(ROOT / "configs/plans/mixtral_8x7b.yaml"), "--world", "12", "--gpu-mem", "80"],
     "parallel.ep=8 does not divide the world size 12; choose parallel.ep from the divisors of 12"),
    ([str(ROOT / "configs/plans/mixtral_8x7b.yaml"), "--gpu-mem", "80"],
     "gatepro-plan needs --world N and --gpu-mem GiB (e.g. --world 64 --gpu-mem 80)"),
])
def test_gatepro_plan_refuses_bad_input_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err == f"gatepro-plan: error: {message}\n"


def test_the_plan_table_in_the_docs_is_what_gatepro_plan_prints():
    """Every setup of configs/plans/plans.yaml validates at its world size, and docs/scaling.md
    shows today's numbers."""
    table = markdown(str(ROOT / "configs/plans/plans.yaml"))
    assert table.count("\n") >= 10 and "| no |" in table
    assert table in (ROOT / "docs/scaling.md").read_text()

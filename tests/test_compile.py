"""train.compile: compiled blocks train as the eager ones do, at ep=1 and on 2 real gloo ranks at ep=2,
with activation checkpointing and with FSDP2 (parallel.dp_shard), and identical blocks compile once.

Tolerance. Inductor fuses the norms, RoPE and residual adds and reorders their fp32 reductions, so the
losses are not bit-identical, and AdamW's first steps (which divide by |g|) amplify the difference.
Measured over the 10 steps of these runs (relative, largest step): ep=1 with seeds 0-3, 1.2e-6 (seed
0, the test's, at step 7), 9.1e-8, 1.7e-7 and 0; with MoE checkpointing the same numbers as without;
ep=2, 1.4e-7 compiled and with FSDP2 + block checkpointing. Step 1 matched exactly in every run. The
tests allow 1e-5, about 8x the worst measured and the bar tests/test_trainer.py sets between layouts;
a real fault is far above it: one AdamW update at lr 3e-3 moves the loss by ~1e-2 (5.557 -> 5.505
from step 1 to 2), so a stale parameter or a lost gradient in a compiled graph shows by step 2.

Speed of the suite: every run here uses the same per-rank shapes (4 sequences of 32 per micro-batch and
per evaluation batch: ep=1 with a global batch of 4, ep=2 with 8), so the kernels inductor builds for
the first run come from its on-disk cache in every later one, and the ep=2 ranks run all their
variants in one spawn.
"""
from __future__ import annotations

from distributed import run_on_ranks
from test_trainer import tiny_config
from gatepro_dist.train.engine import train
from gatepro_dist.train.parallel import build_parallel_groups, single_process_groups

STEPS = ["train.steps=10", "train.save_every=1000"]
REL_TOL = 1e-5
# Per MoE block: the half before the (eager) MoE layer and the residual add after it, for training
# and again without grad for the last step's evaluation. Two identical blocks compile these once.
GRAPHS_PER_RUN = 4
MOE_GRAPH_BREAK = "MoELayer.forward"


def assert_losses_close(got, expected, what):
    assert len(got) == len(expected) == 10
    for step, (x, y) in enumerate(zip(got, expected), start=1):
        assert abs(x - y) <= REL_TOL * abs(y), f"{what}, step {step}: {x!r} vs eager {y!r}"


def compile_counters() -> tuple[int, set[str]]:
    """Graphs dynamo has compiled in this process, and the reasons of its graph breaks."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], set(counters["graph_break"])


def _train(run_dir, world, overrides, dp_shard=False):
    cfg = tiny_config(run_dir, *STEPS, *overrides, world_size=world)
    groups = build_parallel_groups(cfg.parallel.ep, "cpu", dp_shard) if world > 1 else single_process_groups()
    graphs_before, _ = compile_counters()
    losses = train(cfg, groups, log=lambda *_: None).losses
    return losses, compile_counters()[0] - graphs_before


def _ep2_worker(rank, world, run_dir):
    runs = {
        "eager": _train(f"{run_dir}/eager", world, ["parallel.ep=2"]),
        "compiled": _train(f"{run_dir}/compiled", world, ["parallel.ep=2", "train.compile=true"]),
        "compiled, dp_shard, block checkpointing": _train(
            f"{run_dir}/fsdp", world, ["parallel.ep=2", "train.compile=true", "parallel.dp_shard=true",
                                       "train.activation_checkpointing=block"], dp_shard=True),
    }
    return runs, compile_counters()[1]


def test_compiled_blocks_match_eager_at_ep1(tmp_path):
    """Eager, compiled, and compiled with MoE checkpointing (the checkpoint wraps the eager MoE layer:
    dynamo breaks the graph at it and backward recomputes it as it ran)."""
    batch = ["train.global_batch_size=4"]
    eager, _ = _train(tmp_path / "eager", 1, batch)
    compiled, graphs = _train(tmp_path / "compiled", 1, [*batch, "train.compile=true"])
    assert_losses_close(compiled, eager, "compiled")
    assert graphs == GRAPHS_PER_RUN  # not one set per block: the two blocks share their graphs
    checkpointed, _ = _train(tmp_path / "moe_ckpt", 1, [*batch, "train.compile=true", "train.activation_checkpointing=moe"])
    assert_losses_close(checkpointed, eager, "compiled with moe checkpointing")
    breaks = compile_counters()[1]
    assert breaks and all(MOE_GRAPH_BREAK in reason or "checkpoint" in reason for reason in breaks), breaks


def test_compiled_blocks_match_eager_at_ep2_with_fsdp_and_block_checkpointing(tmp_path):
    """Two gloo ranks at ep=2: compiled losses equal eager ones; so do those of compiled blocks under
    FSDP2 with whole-block checkpointing (the compiled body runs again in backward, unchanged)."""
    (runs, breaks), _ = run_on_ranks(2, _ep2_worker, str(tmp_path))
    eager, _ = runs["eager"]
    for what in ("compiled", "compiled, dp_shard, block checkpointing"):
        losses, _ = runs[what]
        assert_losses_close(losses, eager, what)
    assert runs["eager"][1] == 0 and runs["compiled"][1] == GRAPHS_PER_RUN
    assert all(MOE_GRAPH_BREAK in reason for reason in breaks), breaks


def test_compile_blocks_keeps_parameter_names_and_leaves_moe_layers_eager(tmp_path):
    """Checkpoints of compiled and eager runs are interchangeable: nothing is wrapped."""
    from gatepro_dist.train.compile import compile_blocks
    from gatepro_dist.train.model import Transformer

    cfg = tiny_config(tmp_path)
    model = Transformer(cfg)
    names = [name for name, _ in model.named_parameters()]
    compile_blocks(model)
    assert [name for name, _ in model.named_parameters()] == names
    for block in model.layers:
        assert block._forward._torchdynamo_orig_callable == block.__class__._forward.__get__(block)
        assert block.ffn.forward._torchdynamo_disable
    assert not hasattr(type(model.layers[0].ffn).forward, "_torchdynamo_disable")  # the class is untouched


def test_compile_benchmark_times_both_models_on_the_same_steps(tmp_path):
    """gatepro-bench compile end to end on the tiny model (the ep=1 test's shapes: cached kernels);
    timings are not asserted, only that each model ran every step."""
    import torch

    from gatepro_dist.experiments.bench.compile import measure
    from test_trainer import TINY

    threads = torch.get_num_threads()
    try:
        seconds = measure("1x1", None, [*TINY, "train.global_batch_size=4", f"train.run_dir={tmp_path}"], steps=3)
    finally:
        torch.set_num_threads(threads)
    assert sorted(seconds) == ["compiled", "compiled_cpu", "eager", "eager_cpu"]
    assert all(len(values) == 3 and min(values) > 0 for values in seconds.values())

"""train.activation_checkpointing: the same gradients, fewer saved activations, the all-to-all
recomputed in backward on real gloo groups (ep=2) without a hang.

What backward keeps is counted exactly with ``saved_tensors_hooks`` (bytes are deterministic;
each storage once, parameters left out);
the resident-memory saving of a training step is measured by ``gatepro-bench checkpointing`` and
reported in docs/benchmarks.md, not asserted here.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from gatepro_dist.experiments.bench.checkpointing import saved_activation_bytes
from test_trainer import run_training, tiny_config

MODES = ("none", "moe", "block")


def _step(cfg, groups, tokens):
    """One forward + backward; returns the loss, every gradient, the bytes saved for backward, and
    how often each kind of module ran (a recomputed module runs twice)."""
    from gatepro_dist.moe.layer import MoELayer
    from gatepro_dist.train.model import Attention, Transformer

    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    calls = {"moe": 0, "attention": 0}

    def counter(kind):
        def hook(module, args):
            calls[kind] += 1
        return hook

    # Pre-hooks: a recomputation stops as soon as it has rebuilt what backward needs, so a hook
    # at the end of forward may not run again; the start of forward always does.
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.register_forward_pre_hook(counter("moe"))
        elif isinstance(module, Attention):
            module.register_forward_pre_hook(counter("attention"))

    def loss_of_forward():
        logits, stats = model(tokens)
        return logits.float().square().mean() + sum(s.loss for s in stats)

    saved, loss = saved_activation_bytes(model, loss_of_forward)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved, dict(calls)


def _worker(rank, world, ep):
    from gatepro_dist.train.parallel import build_parallel_groups

    groups = build_parallel_groups(ep)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(7 + rank))
    out = {}
    for mode in MODES:
        cfg = tiny_config("/tmp/unused", f"parallel.ep={ep}", f"train.activation_checkpointing={mode}",
                          world_size=world)
        out[mode] = _step(cfg, groups, tokens)
    return out


@pytest.mark.parametrize("world,ep", [(1, 1), (2, 2)])
def test_checkpointing_recomputes_and_gives_identical_gradients(world, ep):
    if world == 1:
        from gatepro_dist.train.parallel import single_process_groups

        results = [{mode: _step(tiny_config("/tmp/unused", f"train.activation_checkpointing={mode}"),
                                single_process_groups(), torch.randint(0, 256, (2, 32),
                                generator=torch.Generator().manual_seed(7))) for mode in MODES}]
    else:
        results = run_on_ranks(world, _worker, ep)
    for rank, out in enumerate(results):
        loss, grads, saved, calls = out["none"]
        layers = calls["moe"]
        assert layers == 2 and calls["attention"] == 2
        for mode in ("moe", "block"):
            m_loss, m_grads, m_saved, m_calls = out[mode]
            assert m_loss == loss, (rank, mode)
            assert m_grads.keys() == grads.keys()
            unequal = [n for n in grads if not torch.equal(grads[n], m_grads[n])]
            assert unequal == [], (rank, mode, unequal)
            # Each checkpointed MoE layer (with its all-to-all at ep=2) ran again in backward.
            assert m_calls["moe"] == 2 * layers
            assert m_calls["attention"] == (2 * layers if mode == "block" else layers)
        assert saved > out["moe"][2] > out["block"][2], (rank, saved, out["moe"][2], out["block"][2])


@pytest.mark.slow
def test_training_with_block_checkpointing_follows_the_same_losses(tmp_path):
    """Two ranks, ep=2, four steps with the overlapped gradient reduction and the optimizer."""
    steps = ["train.steps=4", "parallel.ep=2"]
    plain = run_training(2, tmp_path / "plain", *steps)
    checkpointed = run_training(2, tmp_path / "block", *steps, "train.activation_checkpointing=block")
    assert checkpointed == plain

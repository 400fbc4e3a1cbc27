"""Gradient accumulation is one big batch: train.grad_accum=k splits each global batch into k
micro-batches and scales each loss by 1/k, so losses, gradients and weights equal grad_accum=1.

The load-balancing loss is left out (router.aux_loss_coef=0): it is computed per micro-batch
(f_i, the fraction of a micro-batch's assignments per expert, is not linear in the batch), as
Megatron and DeepSpeed do, so with it on grad_accum=k is not one big batch by definition
(measured: gradient norm 4e-4 relative apart after one step, weights 9e-3 apart after three,
against 3e-6 without it). The z-loss, a mean over tokens, stays on: it splits exactly.
"""
from __future__ import annotations

import json

import torch

from gatepro_dist.train.checkpoint import read_model_tensors
from test_trainer import assert_close_lists, run_training

RUN = ["train.steps=3", "train.save_every=3", "router.aux_loss_coef=0"]


def grad_norms(run_dir) -> list[float]:
    return [json.loads(line)["grad_norm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_equals_one_big_batch_in_losses_gradients_and_weights(tmp_path):
    runs = {"big": (1, 1, 1), "accum4": (1, 1, 4), "ep2-accum2": (2, 2, 2)}  # world, ep, grad_accum
    losses = {name: run_training(world, tmp_path / name, *RUN, f"parallel.ep={ep}", f"train.grad_accum={accum}")
              for name, (world, ep, accum) in runs.items()}
    weights = {name: read_model_tensors(tmp_path / name / "checkpoints" / "step_00000003") for name in runs}
    big = weights["big"]
    for name in ("accum4", "ep2-accum2"):
        assert_close_lists(losses[name], losses["big"])
        assert_close_lists(grad_norms(tmp_path / name), grad_norms(tmp_path / "big"))  # after reduction, before clipping
        assert sorted(weights[name]) == sorted(big)
        for key, tensor in big.items():  # after 3 AdamW steps: a wrong gradient anywhere shows here
            torch.testing.assert_close(weights[name][key], tensor, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
    assert losses["big"][-1] < losses["big"][0]

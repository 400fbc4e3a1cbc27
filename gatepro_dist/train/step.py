"""What a training step does around its engine, shared by the native trainer (``trainer.py``) and the
DeepSpeed backend (``backends/deepspeed_trainer.py``): this rank's share of each global batch, the MoE
statistics of a step, the mean over the world, evaluation, and the work after each update (metrics,
preemption, checkpoint).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cluster.preemption import Preempted, PreemptionWatch
from ..config import Config
from ..moe import comm
from ..moe.layer import MoEStats
from ..moe.routing import gate_similarity_stats
from .checkpoint import latest_checkpoint
from .data import build_data
from .metrics import MetricsWriter, ProgressBar
from .model import Transformer
from .parallel import ParallelGroups


@dataclass
class TrainResult:
    steps_done: int
    losses: list[float]  # global mean training loss of each step run in this call
    val_loss: float | None
    run_dir: Path


def my_part(global_indices: np.ndarray, grad_accum: int, groups: ParallelGroups) -> list[np.ndarray]:
    """This rank's share of each global micro-batch (micro-batch first, then rank)."""
    micro = np.split(global_indices, grad_accum)
    return [np.split(m, groups.world_size)[groups.rank] for m in micro]


def autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def mean_over_world(values: list[float], groups: ParallelGroups) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm.device_for(groups.world_group))
    comm.all_reduce_sum(t, groups.world_group)
    return (t / groups.world_size).tolist()


class StepStats:
    """Per-layer MoE statistics summed over the micro-batches of one optimizer step."""

    def __init__(self):
        self.layers: list[dict] | None = None

    def add(self, stats: list[MoEStats]) -> None:
        if self.layers is None:
            self.layers = [dict(counts=torch.zeros_like(s.tokens_per_expert), aux=0.0, z=0.0, dropped=0,
                                penalised=0, changed=0, n=0, assignments=0, rows_max=0) for s in stats]
        for acc, s in zip(self.layers, stats):
            acc["counts"] += s.tokens_per_expert
            acc["aux"] += float(s.aux_loss.detach())
            acc["z"] += float(s.z_loss.detach())
            acc["dropped"] += s.dropped_tokens
            acc["penalised"] += s.gatepro_penalised
            acc["changed"] += s.gatepro_topk_changed
            acc["assignments"] += int(s.tokens_per_expert.sum())
            acc["rows_max"] = max(acc["rows_max"], s.expert_rows_max)
            acc["n"] += 1

    def records(self, groups: ParallelGroups) -> list[dict]:
        layers = self.layers or []
        losses = mean_over_world([v for acc in layers for v in (acc["aux"] / acc["n"], acc["z"] / acc["n"])], groups)
        rows_max = comm.all_reduce_max(torch.tensor([acc["rows_max"] for acc in layers], dtype=torch.long,
                                                    device=comm.device_for(groups.world_group)),
                                       groups.world_group).tolist()
        out = []
        for i, acc in enumerate(layers):
            counts = acc["counts"].cpu()
            out.append({
                "layer": i, "zero_token_experts": int((counts == 0).sum()),
                "max_load": int(counts.max()), "mean_load": float(counts.float().mean()),
                "aux_loss": losses[2 * i], "z_loss": losses[2 * i + 1],
                "dropped_tokens": acc["dropped"], "drop_rate": acc["dropped"] / max(acc["assignments"], 1),
                "expert_rows_max": rows_max[i], "gatepro_penalised": acc["penalised"],
                "gatepro_topk_changed": acc["changed"], "tokens_per_expert": counts.tolist(),
            })
        return out


def finish_step(record: dict, cfg: Config, groups: ParallelGroups, device, model: Transformer, data,
                metrics: MetricsWriter, progress: ProgressBar, preemption: PreemptionWatch | None, save,
                run_dir: Path, val_loss: float | None, eval_model=None) -> float | None:
    """Everything after a step's update, for both engines: router similarity and evaluation when
    due, the metrics line, the agreed preemption check and the checkpoint. Returns the latest
    validation loss; raises Preempted after saving when the ranks agreed to stop. ``eval_model``
    (default ``model``) is what evaluation calls, e.g. the module a DeepSpeed engine wraps."""
    t, done = cfg.train, record["step"]
    if done % t.stats_every == 0 or done == t.steps:
        with torch.no_grad():
            for entry, layer in zip(record["moe"], model.moe_layers):
                entry["similarity"] = gate_similarity_stats(layer.router.gathered_weight())
    if done % t.eval_every == 0 or done == t.steps:
        evaluated = model if eval_model is None else eval_model
        val_loss = record["val_loss"] = evaluate(evaluated, data.val, cfg, groups, device)
    metrics.write(record)
    progress.update(done, loss=record["loss"], tokens_per_s=record["tokens_per_s"])
    # Every rank agrees on the step to stop at (a MAX all-reduce of the signal flag).
    stop = preemption.agreed(groups.world_group, device) if preemption is not None and done < t.steps else 0
    if stop or done % t.save_every == 0 or done == t.steps:
        save(done)
    if stop:
        progress.close()
        metrics.close()
        raise Preempted(done, stop, latest_checkpoint(run_dir))
    return val_loss


def evaluate(model, val, cfg: Config, groups: ParallelGroups, device) -> float:
    """Mean next-token loss over the first ``eval_batches`` global batches of the validation set."""
    per_rank = max(1, cfg.train.global_batch_size // groups.world_size)
    total_blocks = len(val)
    model.eval()
    losses = []
    with torch.no_grad(), autocast(cfg, device):
        for b in range(cfg.train.eval_batches):
            start = (b * per_rank * groups.world_size + groups.rank * per_rank) % total_blocks
            idx = (np.arange(per_rank) + start) % total_blocks
            inputs, targets = val.batch(idx)
            logits, _ = model(inputs.to(device))
            losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())))
    model.train()
    return mean_over_world([sum(losses) / len(losses)], groups)[0]


def load_data(cfg: Config):
    """Train/validation views of the configured corpus (raises DataError on bad data)."""
    return build_data(cfg.data.source, cfg.data.seq_len, cfg.data.val_fraction, vocab_size=cfg.model.vocab_size,
                      bin_dtype=cfg.data.bin_dtype, max_bytes=cfg.data.max_bytes, tokenizer=cfg.data.tokenizer)

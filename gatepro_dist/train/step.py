"""What a training step does around its engine, shared by the native trainer (``trainer.py``) and the
DeepSpeed backend (``backends/deepspeed_trainer.py``): this rank's share of each global batch, the MoE
statistics of a step, the mean over the world, evaluation, and the work after each update (metrics,
preemption, checkpoint).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cluster.preemption import Preempted, PreemptionWatch
from ..config import Config, config_hash
from ..moe import comm
from ..moe.layer import MoEStats
from ..moe.routing import gate_similarity_stats, margin_summary
from .checkpoint import latest_checkpoint
from .data import GlobalBatchSampler, build_data
from .metrics import MetricsWriter, ProgressBar
from .model import Transformer
from .numerics import set_numerics
from .optim import lr_at
from .parallel import ParallelGroups
from .sharding import shard_model


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


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device`` without making the host wait: on CUDA a copy from pageable memory
    blocks until it is done, so the batch is pinned first and copied asynchronously (torch's
    pinned-memory allocator keeps the buffer until the copy has run). On the CPU nothing moves."""
    if device.type == "cpu":
        return batch
    if device.type == "cuda":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def begin_step(cfg: Config, step: int, model: Transformer, optimizer) -> tuple[bool, float]:
    """GatePro's schedule and the learning rate of ``step`` (0-based), set on the model and the optimizer."""
    t = cfg.train
    gatepro_on = cfg.router.gatepro.enabled_at(step)
    model.set_gatepro(gatepro_on)
    lr = lr_at(step, peak=t.lr, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return gatepro_on, lr


def micro_batch_loss(forward, inputs_BS: torch.Tensor, targets_BS: torch.Tensor):
    """``(cross-entropy, objective, MoE statistics)`` of one micro-batch: the objective adds every MoE
    layer's weighted aux and z losses. ``forward`` is the model, the engine, or the model under autocast."""
    logits_BSV, stats = forward(inputs_BS)
    ce = F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())
    loss = ce + sum((s.loss for s in stats), torch.zeros((), device=ce.device))
    return ce, loss, stats


def mean_over_world(values: list[float], groups: ParallelGroups) -> list[float]:
    """Mean over the world of host numbers (evaluation losses): a host control message."""
    return [v / groups.world_size for v in comm.host_all_reduce(values, groups.world_group)]


class StepStats:
    """Per-layer MoE statistics summed over the micro-batches of one optimizer step.

    Everything stays on the device (0-dim and [N] tensors): ``read_step`` reduces a whole step's
    statistics with one collective per kind and reads them, with the loss and the gradient norm,
    in a single host copy.
    """

    def __init__(self):
        self.layers: list[dict] | None = None
        self.micro_batches = 0

    def add(self, stats: list[MoEStats]) -> None:
        if self.layers is None:
            self.layers = [dict(counts=torch.zeros_like(s.tokens_per_expert),
                                losses=torch.zeros(2, dtype=torch.float64, device=s.tokens_per_expert.device),
                                counted=torch.zeros(4, dtype=torch.long, device=s.tokens_per_expert.device),
                                rows_max=torch.zeros((), dtype=torch.long, device=s.tokens_per_expert.device),
                                margin=torch.zeros_like(s.routing_margin))
                           for s in stats]
        for acc, s in zip(self.layers, stats):
            acc["counts"] += s.tokens_per_expert
            acc["losses"] += torch.stack([s.aux_loss.detach(), s.z_loss.detach()]).to(torch.float64)
            acc["counted"] += torch.stack([s.dropped_tokens, s.gatepro_penalised, s.gatepro_topk_changed,
                                           s.tokens_per_expert.sum()])
            acc["rows_max"] = torch.maximum(acc["rows_max"], s.expert_rows_max)
            acc["margin"] += s.routing_margin
        self.micro_batches += 1


@dataclass
class StepReadout:
    """A step's numbers on the host, the same on every rank."""

    loss: float  # global mean training loss
    grad_norm: float
    finite: bool  # loss and gradient norm finite on every rank
    moe: list[dict]  # one metrics entry per MoE layer

    def record(self, step_done: int, lr: float, gatepro_on: bool, tokens_per_s: float) -> dict:
        """The step's metrics line (``metrics.jsonl``), the same for both engines."""
        return {"step": step_done, "loss": self.loss, "lr": lr, "grad_norm": self.grad_norm,
                "tokens_per_s": tokens_per_s, "gatepro": gatepro_on, "moe": self.moe}


def read_step(loss_sum: torch.Tensor, grad_accum: int, grad_norm: torch.Tensor, step_stats: StepStats,
              groups: ParallelGroups) -> StepReadout:
    """Reduce a step's loss and statistics over the world and read them in one host copy.

    ``loss_sum`` is this rank's summed micro-batch loss (a device tensor). The one read is
    inherent: the host decides whether to apply the update and writes the metrics line. The
    finite flag is summed over the world, so every rank takes the same decision even when only
    one rank's gradients went bad after the reduction.
    """
    layers = step_stats.layers or []
    n = max(step_stats.micro_batches, 1)
    device = loss_sum.device
    grad_norm = torch.as_tensor(grad_norm, dtype=torch.float64).to(device)
    # Summed over the world: the mean loss, each layer's (aux, z) share, the non-finite flag, and
    # each layer's routing-margin counts (this rank's tokens; float64 holds them exactly).
    world_sum = torch.cat([(loss_sum.to(torch.float64) / grad_accum).reshape(1),
                           *(acc["losses"] / n for acc in layers),
                           (~torch.isfinite(grad_norm)).to(torch.float64).reshape(1),
                           *(acc["margin"].to(torch.float64) for acc in layers)])
    comm.all_reduce_sum(world_sum, groups.world_group)
    rows_max_L = torch.stack([acc["rows_max"] for acc in layers]) if layers else world_sum.new_zeros(0).long()
    comm.all_reduce_max(rows_max_L, groups.world_group)
    # Counts are global already (summed over EP and EDP in the layer).
    host = torch.cat([world_sum, grad_norm.reshape(1), rows_max_L.to(torch.float64),
                      *(acc["counted"].to(torch.float64) for acc in layers),
                      *(acc["counts"].to(torch.float64) for acc in layers)]).tolist()
    loss, *rest = host
    losses_L2, rest = rest[: 2 * len(layers)], rest[2 * len(layers):]
    bad_grad_ranks, *rest = rest
    margin_width = layers[0]["margin"].numel() if layers else 0
    margins, (norm, *rest) = rest[: margin_width * len(layers)], rest[margin_width * len(layers):]
    rows_max, rest = rest[: len(layers)], rest[len(layers):]
    counted, rest = rest[: 4 * len(layers)], rest[4 * len(layers):]
    out = []
    for i, acc in enumerate(layers):
        num_experts = acc["counts"].numel()
        counts = [int(c) for c in rest[i * num_experts:(i + 1) * num_experts]]
        dropped, penalised, changed, assignments = (int(v) for v in counted[4 * i:4 * i + 4])
        out.append({
            "layer": i, "zero_token_experts": sum(c == 0 for c in counts),
            "max_load": max(counts), "mean_load": sum(counts) / num_experts,
            "aux_loss": losses_L2[2 * i] / groups.world_size, "z_loss": losses_L2[2 * i + 1] / groups.world_size,
            "dropped_tokens": dropped, "drop_rate": dropped / max(assignments, 1),
            "expert_rows_max": int(rows_max[i]), "gatepro_penalised": penalised,
            "gatepro_topk_changed": changed, "tokens_per_expert": counts,
            "routing_margin": margin_summary([int(v) for v in margins[i * margin_width:(i + 1) * margin_width]]),
        })
    loss /= groups.world_size
    return StepReadout(loss, norm, math.isfinite(loss) and bad_grad_ranks == 0, out)


def finish_step(record: dict, cfg: Config, groups: ParallelGroups, device, model: Transformer, data,
                metrics: MetricsWriter, progress: ProgressBar, preemption: PreemptionWatch | None, save,
                run_dir: Path, val_loss: float | None, eval_model=None) -> float | None:
    """Everything after a step's update, for both engines: router similarity and evaluation when
    due, the metrics line, the agreed preemption check and the checkpoint. Returns the latest
    validation loss; raises Preempted after saving when the ranks agreed to stop. ``eval_model``
    (default ``model``) is what evaluation calls, e.g. the module a DeepSpeed engine wraps."""
    t, done = cfg.train, record["step"]
    if done % t.stats_every == 0 or done == t.steps:
        for entry, similarity in zip(record["moe"], router_similarity(model)):
            entry["similarity"] = similarity
    if done % t.eval_every == 0 or done == t.steps:
        evaluated = model if eval_model is None else eval_model
        val_loss = record["val_loss"] = evaluate(evaluated, data.val, cfg, groups, device)
    metrics.write(record)
    progress.update(done, loss=record["loss"], tokens_per_s=record["tokens_per_s"])
    # Every rank agrees on the step to stop at (a MAX all-reduce of the signal flag).
    stop = (preemption.agreed(groups.world_group, comm.host_device(groups.world_group))
            if preemption is not None and done < t.steps else 0)
    if stop or done % t.save_every == 0 or done == t.steps:
        save(done)
    if stop:
        progress.close()
        metrics.close()
        raise Preempted(done, stop, latest_checkpoint(run_dir))
    return val_loss


def router_similarity(model: Transformer) -> list[dict[str, float]]:
    """Each MoE layer's gate-similarity statistics on its whole router weight, read in one host copy.

    A collective (every rank calls it): the weight is gathered from the EP group, and under
    ``parallel.dp_shard`` from the FSDP shards too, so every rank sees all N rows."""
    with torch.no_grad():
        per_layer = [gate_similarity_stats(layer.router.full_weight()) for layer in model.moe_layers]
        if not per_layer:
            return []
        keys = list(per_layer[0])
        values = torch.stack([torch.stack([s[k] for k in keys]) for s in per_layer]).tolist()
    return [dict(zip(keys, row)) for row in values]


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
            logits, _ = model(to_device(inputs, device))
            losses.append(F.cross_entropy(logits.float().flatten(0, 1), to_device(targets, device).flatten()).detach())
    model.train()
    per_batch = torch.stack(losses).to(torch.float64).tolist()  # one read for every batch
    return mean_over_world([sum(per_batch) / len(per_batch)], groups)[0]


def load_data(cfg: Config):
    """Train/validation views of the configured corpus (raises DataError on bad data)."""
    return build_data(cfg.data.source, cfg.data.seq_len, cfg.data.val_fraction, vocab_size=cfg.model.vocab_size,
                      bin_dtype=cfg.data.bin_dtype, max_bytes=cfg.data.max_bytes, tokenizer=cfg.data.tokenizer)


@dataclass
class RunSetup:
    """What both engines build before their first step, in the same order (so the same seed
    gives the same model and the same batches in either engine)."""

    run_dir: Path
    data: object
    sampler: GlobalBatchSampler
    model: Transformer
    cfg_dict: dict
    cfg_hash: str


def set_up_run(cfg: Config, groups: ParallelGroups, device, data=None) -> RunSetup:
    """Numerics, seed, data, sampler and the model on ``device``. Writes nothing."""
    t = cfg.train
    set_numerics(t, device)
    torch.manual_seed(t.seed)
    data = data if data is not None else load_data(cfg)
    sampler = GlobalBatchSampler(len(data.train), t.global_batch_size, 1, 0, t.seed)
    model = Transformer(cfg, groups.ep_group, groups.edp_group).to(device)
    if cfg.parallel.dp_shard != groups.dp_shard:
        raise ValueError(f"parallel.dp_shard={cfg.parallel.dp_shard} but the groups were built with "
                         f"dp_shard={groups.dp_shard}; pass cfg.parallel.dp_shard to build_parallel_groups")
    if groups.dp_shard:
        shard_model(model, cfg, groups)
    return RunSetup(Path(t.run_dir), data, sampler, model, cfg.to_dict(), config_hash(cfg))


def open_run_outputs(cfg: Config, groups: ParallelGroups, run_dir: Path, start: int) -> tuple[MetricsWriter, ProgressBar]:
    """After the checkpoint (if any) was accepted: the run directory, its resolved config, the
    metrics log cut back to ``start`` and the progress line. Only rank 0 writes; called only now,
    a refused checkpoint leaves the run directory as it was."""
    if groups.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    metrics = MetricsWriter(run_dir, enabled=groups.is_main)
    if groups.is_main:
        metrics.truncate_after(start + 1)
    return metrics, ProgressBar(cfg.train.steps, enabled=groups.is_main and cfg.train.progress)

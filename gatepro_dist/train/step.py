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
from ..moe.routing import gate_similarity_stats
from .checkpoint import latest_checkpoint
from .compile import compile_blocks
from ..data import DataSplit, MixtureSampler, MixtureVal, PrefetchingView, data_from_config
from ..data.mixing import GlobalBatchSampler
from .metrics import MetricsWriter, ProgressBar
from .model import Transformer
from .numerics import set_numerics
from .optim import scheduled_lr
from .parallel import ParallelGroups
from .readout import LogWindow, StepReadout, StepStats, read_step  # noqa: F401 (the engines' one import)
from .sharding import shard_model
from .step_numbers import peak_memory_gib, reset_peak_memory, throughput_numbers


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
    lr = scheduled_lr(step, t)
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


def finish_step(window: LogWindow, done: int, lr: float, gatepro_on: bool, finite: bool, cfg: Config,
                groups: ParallelGroups, device, model: Transformer, data, metrics: MetricsWriter,
                progress: ProgressBar, preemption: PreemptionWatch | None, save, run_dir: Path,
                val_loss: float | None, eval_model=None) -> float | None:
    """Everything after a step's update (its readout already ``add``ed to ``window``), for both
    engines: router similarity and evaluation when due, the metrics line when the window closes
    (or the ranks agreed to stop), the progress line, and the checkpoint. Returns the latest
    validation loss; raises Preempted after saving when the ranks agreed to stop. ``eval_model``
    (default ``model``) is what evaluation calls, e.g. the module a DeepSpeed engine wraps."""
    t = cfg.train
    if done % t.stats_every == 0 or done == t.steps:
        window.note(similarity=router_similarity(model))
    if done % t.eval_every == 0 or done == t.steps:
        evaluated = model if eval_model is None else eval_model
        losses = evaluate_by_source(evaluated, data.val, cfg, groups, device)
        val_loss = losses["val_loss"]
        window.note(**losses)
    if hasattr(data.train, "tokens_per_source"):  # a mixture: the training tokens each source gave so far
        window.note(tokens_per_source=data.train.tokens_per_source(done))
    progress.update(done, loss=window.losses[-1], tokens_per_s=window.tokens / max(window.seconds, 1e-12))
    # Every rank agrees on the step to stop at (a MAX all-reduce of the signal flag).
    stop = (preemption.agreed(groups.world_group, comm.host_device(groups.world_group))
            if preemption is not None and done < t.steps else 0)
    if stop or window.due(done, t.steps, finite):
        metrics.write(metrics_line(window, done, lr, gatepro_on, cfg, groups, device))
    if stop or done % t.save_every == 0 or done == t.steps:
        save(done, wait=bool(stop) or done == t.steps)  # an async save may run on unless the run ends here
    if stop:
        progress.close()
        metrics.close()
        raise Preempted(done, stop, latest_checkpoint(run_dir))
    return val_loss


def metrics_line(window: LogWindow, done: int, lr: float, gatepro_on: bool, cfg: Config, groups: ParallelGroups,
                 device) -> dict:
    """Close ``window`` into a metrics line, with TFLOP/s per rank, MFU and the peak memory since the
    previous line (host-side counters: no device read)."""
    line = window.record(done, lr, gatepro_on)
    line.update(throughput_numbers(cfg, device, line["tokens_per_s"], groups.world_size))
    line.update(peak_memory_gib(device))
    reset_peak_memory(device)
    return line


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


def evaluate_by_source(model, val, cfg: Config, groups: ParallelGroups, device) -> dict:
    """``{"val_loss": ...}``; for held-out data of several sources also ``val_loss_per_source``
    (each source's loss over its first ``eval_batches`` global batches), and ``val_loss`` is their
    mean weighted by the sources' weights."""
    if not isinstance(val, MixtureVal):
        return {"val_loss": evaluate(model, val, cfg, groups, device)}
    per_source = {name: evaluate(model, view, cfg, groups, device) for name, view in zip(val.names, val.views)}
    total = sum(val.weights)
    mean = sum(w * loss for w, loss in zip(val.weights, per_source.values())) / total
    return {"val_loss": mean, "val_loss_per_source": per_source}


def evaluate(model, val, cfg: Config, groups: ParallelGroups, device) -> float:
    """Mean next-token loss over the first ``eval_batches`` global batches of the validation set
    (of every source, weighted, when it holds several)."""
    if isinstance(val, MixtureVal):
        return evaluate_by_source(model, val, cfg, groups, device)["val_loss"]
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
    if hasattr(model, "reshard"):  # FSDP2 keeps the root unsharded after a forward without backward
        model.reshard()
    per_batch = torch.stack(losses).to(torch.float64).tolist()  # one read for every batch
    return mean_over_world([sum(per_batch) / len(per_batch)], groups)[0]


def load_data(cfg: Config) -> DataSplit:
    """Train/validation views of the configured corpus (raises DataError on bad data). With
    ``data.document_mask`` it also settles ``cfg.data.eos_id`` (the source's own when unset)."""
    return data_from_config(cfg)


@dataclass
class RunSetup:
    """What both engines build before their first step, in the same order (so the same seed
    gives the same model and the same batches in either engine)."""

    run_dir: Path
    data: object
    sampler: GlobalBatchSampler | MixtureSampler
    model: Transformer
    cfg_dict: dict
    cfg_hash: str


def set_up_run(cfg: Config, groups: ParallelGroups, device, data=None) -> RunSetup:
    """Numerics, seed, data, sampler and the model on ``device``. Writes nothing."""
    t = cfg.train
    set_numerics(t, device)
    torch.manual_seed(t.seed)
    data = data if data is not None else load_data(cfg)
    if cfg.data.document_mask and cfg.data.eos_id is None:  # views built by hand: their source's id
        cfg.data.eos_id = getattr(data.train, "eos_id", None)
        if cfg.data.eos_id is None:
            raise ValueError("data.document_mask=true but neither data.eos_id nor the data source names an "
                             "end-of-document id; set data.eos_id")
    sampler = (data.train.make_sampler(t.global_batch_size, t.seed) if hasattr(data.train, "make_sampler")
               else GlobalBatchSampler(len(data.train), t.global_batch_size, 1, 0, t.seed))
    # The next micro-batches are read (and on CUDA pinned) by a background thread while this one trains.
    data = DataSplit(PrefetchingView(data.train, sampler, lambda step: my_part(
        sampler.global_batch(step), t.grad_accum, groups), pin=device.type == "cuda"), data.val)
    model = Transformer(cfg, groups.ep_group, groups.edp_group).to(device)
    if cfg.parallel.dp_shard != groups.dp_shard:
        raise ValueError(f"parallel.dp_shard={cfg.parallel.dp_shard} but the groups were built with "
                         f"dp_shard={groups.dp_shard}; pass cfg.parallel.dp_shard to build_parallel_groups")
    if t.compile:
        compile_blocks(model)  # before FSDP wraps the blocks, as torchtitan does
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
    metrics = MetricsWriter(run_dir, enabled=groups.is_main, wandb=cfg.metrics.wandb,
                            wandb_project=cfg.metrics.wandb_project, config=cfg.to_dict())
    if groups.is_main:
        metrics.truncate_after(start + 1)
    return metrics, ProgressBar(cfg.train.steps, enabled=groups.is_main and cfg.train.progress)

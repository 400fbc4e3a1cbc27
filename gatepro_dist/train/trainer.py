"""The training loop: data -> model -> loss -> gradients reduced over the right groups -> AdamW.

Every rank reads its own slice of each global micro-batch; the slices of all ranks together are
the same sequences whatever the layout, so dp x ep layouts follow the same loss trajectory.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..moe import comm
from ..cluster import faults
from .checkpoint import (check_compatible, latest_checkpoint, load_checkpoint, read_manifest, resolve_resume,
                         save_checkpoint)
from ..config import Config, config_hash
from .data import GlobalBatchSampler, build_data
from .metrics import MetricsWriter, ProgressBar
from .model import Transformer
from ..moe.layer import MoELayer, MoEStats
from .optim import clip_gradients, global_grad_norm, lr_at, param_groups, reduce_gradients
from .parallel import ParallelGroups
from ..cluster.preemption import NonFiniteStop, Preempted, PreemptionWatch
from ..moe.routing import gate_similarity_stats


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


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _mean_over_world(values: list[float], groups: ParallelGroups) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=comm.device_for(groups.world_group))
    comm.all_reduce_sum(t, groups.world_group)
    return (t / groups.world_size).tolist()


class _StepStats:
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
        losses = _mean_over_world([v for acc in layers for v in (acc["aux"] / acc["n"], acc["z"] / acc["n"])], groups)
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


def locate_non_finite(model: Transformer, finite_L: torch.Tensor, groups: ParallelGroups) -> dict:
    """Where a non-finite step went wrong, the same answer on every rank: the first block whose
    output was non-finite on any rank (forward), else the first parameter with a non-finite
    gradient (backward), else the loss itself."""
    bad_L = (~finite_L).to(torch.float64)
    comm.all_reduce_sum(bad_L, groups.world_group)
    if bool(bad_L.any()):
        layer = int(bad_L.nonzero()[0])
        kind = "MoE" if isinstance(model.layers[layer].ffn, MoELayer) else "dense"
        return {"what": "activation", "layer": layer, "where": f"the output of layer {layer} ({kind})"}
    names = [name for name, p in model.named_parameters()]
    bad_P = torch.tensor([float(p.grad is not None and not bool(torch.isfinite(p.grad).all()))
                          for p in model.parameters()], dtype=torch.float64, device=finite_L.device)
    comm.all_reduce_sum(bad_P, groups.world_group)
    if bool(bad_P.any()):
        name = names[int(bad_P.nonzero()[0])]
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        return {"what": "gradient", "layer": layer, "where": f"the gradient of {name}"}
    return {"what": "loss", "layer": None, "where": "the loss (activations and gradients were finite)"}


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
    with torch.no_grad(), _autocast(cfg, device):
        for b in range(cfg.train.eval_batches):
            start = (b * per_rank * groups.world_size + groups.rank * per_rank) % total_blocks
            idx = (np.arange(per_rank) + start) % total_blocks
            inputs, targets = val.batch(idx)
            logits, _ = model(inputs.to(device))
            losses.append(float(F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())))
    model.train()
    return _mean_over_world([sum(losses) / len(losses)], groups)[0]


def load_data(cfg: Config):
    """Train/validation views of the configured corpus (raises DataError on bad data)."""
    return build_data(cfg.data.source, cfg.data.seq_len, cfg.data.val_fraction, vocab_size=cfg.model.vocab_size,
                      bin_dtype=cfg.data.bin_dtype, max_bytes=cfg.data.max_bytes, tokenizer=cfg.data.tokenizer)


def train(cfg: Config, groups: ParallelGroups, device=torch.device("cpu"), data=None, log=print,
          preemption: PreemptionWatch | None = None) -> TrainResult:
    if cfg.train.backend == "deepspeed":
        from ..backends.deepspeed_trainer import train as train_on_deepspeed

        return train_on_deepspeed(cfg, groups, device, data, log, preemption)
    t = cfg.train
    run_dir = Path(t.run_dir)
    if t.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)

    data = data if data is not None else load_data(cfg)
    sampler = GlobalBatchSampler(len(data.train), t.global_batch_size, 1, 0, t.seed)
    model = Transformer(cfg, groups.ep_group, groups.edp_group).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2),
                                  foreach=False)
    cfg_dict, cfg_hash = cfg.to_dict(), config_hash(cfg)

    start = 0
    resume_from = resolve_resume(run_dir, t.resume, groups, log)  # damaged checkpoints are skipped
    if resume_from is not None:
        changed = check_compatible(read_manifest(resume_from), cfg_dict, resume_from)
        state = load_checkpoint(resume_from, model, optimizer, groups)
        if state.get("weights_only"):  # e.g. an imported model: fresh optimizer, data from the start
            what = f"initialised weights from {resume_from} (weights only: fresh optimizer, step 0)"
        else:
            sampler.load_state_dict(state["sampler"])
            start = state["step"]
            what = f"resumed from {resume_from} at step {start}"
        if groups.is_main:
            log(what + (f" (changed: {', '.join(changed)})" if changed else ""))
    if groups.is_main:  # only now: a refused checkpoint leaves the run directory as it was
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    metrics = MetricsWriter(run_dir, enabled=groups.is_main)
    if groups.is_main:
        metrics.truncate_after(start + 1)
    progress = ProgressBar(t.steps, enabled=groups.is_main and t.progress)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    losses, val_loss = [], None

    def save(step_done: int) -> None:
        save_checkpoint(run_dir, step_done, model, optimizer, groups,
                        {"step": step_done, "sampler": sampler.state_dict()}, cfg_dict, cfg_hash)

    for step in range(start, t.steps):
        began = time.perf_counter()
        faults.set_step(step + 1)
        gatepro_on = cfg.router.gatepro.enabled_at(step)
        model.set_gatepro(gatepro_on)
        lr = lr_at(step, peak=t.lr, warmup=t.warmup_steps, total=t.steps, min_ratio=t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_stats, ce_sum, finite_L = _StepStats(), 0.0, True
        for part in my_part(sampler.global_batch(step), t.grad_accum, groups):
            inputs, targets = data.train.batch(part)
            with _autocast(cfg, device):
                logits, stats = model(inputs.to(device))
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.to(device).flatten())
            loss = ce + sum((s.loss for s in stats), torch.zeros((), device=device))
            (loss / t.grad_accum).backward()
            step_stats.add(stats)
            ce_sum += float(ce.detach())
            finite_L = model.finite_outputs_L & finite_L
        sampler.step = step + 1
        faults.corrupt_gradients(model)

        reduce_gradients(model, groups)
        grad_norm = global_grad_norm(model, groups)
        step_loss = _mean_over_world([ce_sum / t.grad_accum], groups)[0]
        finite = math.isfinite(step_loss) and bool(torch.isfinite(grad_norm))
        where = None if finite else locate_non_finite(model, finite_L, groups)
        if finite:
            clip_gradients(model, grad_norm, t.grad_clip)
            faults.point("optimizer")
            optimizer.step()
            for layer, acc in zip(model.moe_layers, step_stats.layers or []):
                layer.router.update_bias(acc["counts"])
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - began
        losses.append(step_loss)

        done = step + 1
        record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_step / elapsed, "gatepro": gatepro_on,
                  "moe": step_stats.records(groups)}
        if not finite:
            record.update(skipped=True, non_finite=where)
            if groups.is_main:
                log(f"non-finite {where['what']} at step {done}, first in {where['where']}: "
                    + ("step skipped (train.nan_policy=skip)" if t.nan_policy == "skip"
                       else "saving a checkpoint and stopping (train.nan_policy=stop)"))
            if t.nan_policy == "stop":
                metrics.write(record)
                save(done)
                metrics.close()
                raise NonFiniteStop(
                    f"non-finite {where['what']} at step {done}, first in {where['where']}; checkpoint "
                    f"{latest_checkpoint(run_dir)} saved (without this step's update); lower train.lr or raise "
                    "train.grad_clip/warmup, then resume with train.resume=auto")
        val_loss = finish_step(record, cfg, groups, device, model, data, metrics, progress, preemption, save,
                               run_dir, val_loss)

    progress.close()
    metrics.close()
    return TrainResult(t.steps, losses, val_loss, run_dir)

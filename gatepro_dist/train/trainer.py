"""The native engine's training loop: data -> model -> loss -> gradients reduced over the right groups -> AdamW.

Every rank reads its own slice of each global micro-batch; the slices of all ranks together are
the same sequences whatever the layout, so dp x ep layouts follow the same loss trajectory.
``engine.train`` chooses between this loop and the DeepSpeed backend's.
"""
from __future__ import annotations

import torch

from ..cluster import faults
from ..cluster.preemption import NonFiniteStop, PreemptionWatch
from ..config import Config
from ..moe import comm
from ..moe.layer import MoELayer
from .checkpoint import (check_compatible, latest_checkpoint, load_checkpoint, prune_checkpoints, read_manifest,
                         resolve_resume, save_checkpoint)
from .async_checkpoint import AsyncCheckpointer
from .model import Transformer
from .numerics import adamw
from .optim import clip_gradients, global_grad_norm, gradient_sync, param_groups
from .parallel import ParallelGroups
from .step import (LogWindow, StepStats, TrainResult, autocast, begin_step, finish_step, metrics_line,
                   micro_batch_loss, my_part, open_run_outputs, read_step, set_up_run, to_device)
from .step_numbers import StepTimer


def locate_non_finite(model: Transformer, finite_L: torch.Tensor, groups: ParallelGroups) -> dict:
    """Where a non-finite step went wrong, the same answer on every rank: the first block whose
    output was non-finite on any rank (forward), else the first parameter with a non-finite
    gradient (backward), else the loss itself. Runs only after a bad step: its reads do not
    cost a healthy step anything."""
    bad_L = (~finite_L).to(torch.float64)
    comm.all_reduce_sum(bad_L, groups.world_group)
    bad_layers = bad_L.nonzero().flatten().tolist()
    if bad_layers:
        layer = bad_layers[0]
        kind = "MoE" if isinstance(model.layers[layer].ffn, MoELayer) else "dense"
        return {"what": "activation", "layer": layer, "where": f"the output of layer {layer} ({kind})"}
    names = [name for name, p in model.named_parameters()]
    bad_P = torch.stack([
        (~torch.isfinite(comm.local_tensor(p.grad)).all()).to(torch.float64) if p.grad is not None
        else torch.zeros((), dtype=torch.float64, device=finite_L.device)
        for p in model.parameters()])
    comm.all_reduce_sum(bad_P, groups.world_group)
    bad_params = bad_P.nonzero().flatten().tolist()
    if bad_params:
        name = names[bad_params[0]]
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        return {"what": "gradient", "layer": layer, "where": f"the gradient of {name}"}
    return {"what": "loss", "layer": None, "where": "the loss (activations and gradients were finite)"}


def train(cfg: Config, groups: ParallelGroups, device=torch.device("cpu"), data=None, log=print,
          preemption: PreemptionWatch | None = None) -> TrainResult:
    t = cfg.train
    run = set_up_run(cfg, groups, device, data)
    run_dir, data, sampler, model, cfg_dict, cfg_hash = (run.run_dir, run.data, run.sampler, run.model,
                                                         run.cfg_dict, run.cfg_hash)
    optimizer = adamw(param_groups(model, t.weight_decay), t, device)

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
    metrics, progress = open_run_outputs(cfg, groups, run_dir, start)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    losses, val_loss = [], None
    reducer = gradient_sync(model, groups)

    saver = AsyncCheckpointer(groups) if t.async_save else None

    def save(step_done: int, wait: bool = True) -> None:
        """A checkpoint of ``step_done``; with ``train.async_save`` written in the background unless
        ``wait`` (the run's last save, a preemption, a stop), the previous one published first."""
        trainer_state = {"step": step_done, "sampler": sampler.state_dict()}
        if saver is None:
            save_checkpoint(run_dir, step_done, model, optimizer, groups, trainer_state, cfg_dict, cfg_hash)
        else:
            saver.save(run_dir, step_done, model, optimizer, trainer_state, cfg_dict, cfg_hash)
            if wait:
                saver.finish()
        if groups.is_main:
            prune_checkpoints(run_dir, t.keep_last, protected=resume_from)

    def forward(inputs_BS):
        with autocast(cfg, device):  # the cross-entropy runs outside it, in fp32
            return model(inputs_BS)

    window, timer = LogWindow(t.log_every), StepTimer(device)
    for step in range(start, t.steps):
        timer.start()
        faults.set_step(step + 1)
        gatepro_on, lr = begin_step(cfg, step, model, optimizer)

        step_stats, finite_L = StepStats(), True
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once, in read_step
        parts = my_part(sampler.global_batch(step), t.grad_accum, groups)
        for micro, part in enumerate(parts):
            inputs, targets = data.train.batch(part)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            timer.mark("data_s")
            ce, loss, stats = micro_batch_loss(forward, inputs, targets)
            # Dense and expert gradients are reduced bucket by bucket while the last
            # micro-batch's backward still runs; earlier micro-batches only accumulate.
            reducer.arm(last_micro_batch=micro == len(parts) - 1)
            (loss / t.grad_accum).backward()
            step_stats.add(stats)
            ce_sum += ce.detach().to(torch.float64)
            finite_L = model.finite_outputs_L & finite_L
            if micro < len(parts) - 1:
                timer.mark("fwd_bwd_s")
        sampler.step = step + 1
        reducer.finish()
        faults.corrupt_gradients(model)  # after the reduction: read_step's flag makes every rank agree
        timer.mark("fwd_bwd_s")

        grad_norm = global_grad_norm(model, groups)
        readout = read_step(ce_sum, t.grad_accum, grad_norm, step_stats, groups)
        step_loss, finite = readout.loss, readout.finite
        where = None if finite else locate_non_finite(model, finite_L, groups)
        if finite:
            clip_gradients(model, grad_norm, t.grad_clip)
            faults.point("optimizer")
            optimizer.step()
            for layer, acc in zip(model.moe_layers, step_stats.layers or []):
                layer.router.update_bias(acc["counts"])
        optimizer.zero_grad(set_to_none=True)
        timer.mark("optimizer_s")
        window.add(readout, tokens_per_step, timer.elapsed(), timer.split())
        losses.append(step_loss)

        done = step + 1
        if not finite:
            window.note(skipped=True, non_finite=where)
            if groups.is_main:
                log(f"non-finite {where['what']} at step {done}, first in {where['where']}: "
                    + ("step skipped (train.nan_policy=skip)" if t.nan_policy == "skip"
                       else "saving a checkpoint and stopping (train.nan_policy=stop)"))
            if t.nan_policy == "stop":
                metrics.write(metrics_line(window, done, lr, gatepro_on, cfg, groups, device))
                save(done)
                metrics.close()
                raise NonFiniteStop(
                    f"non-finite {where['what']} at step {done}, first in {where['where']}; checkpoint "
                    f"{latest_checkpoint(run_dir)} saved (without this step's update); lower train.lr or raise "
                    "train.grad_clip/warmup, then resume with train.resume=auto")
        val_loss = finish_step(window, done, lr, gatepro_on, finite, cfg, groups, device, model, data, metrics,
                               progress, preemption, save, run_dir, val_loss)

    if saver is not None:
        saver.close()
    progress.close()
    metrics.close()
    return TrainResult(t.steps, losses, val_loss, run_dir)

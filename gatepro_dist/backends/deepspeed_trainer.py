"""``train.backend=deepspeed``: the native training loop's data, model and metrics on a DeepSpeed engine.

Same sampler, same model, same loss, same LR schedule, same metrics records as the native ``trainer.train``;
what changes is who reduces gradients (DeepSpeed, over our groups, see ``deepspeed_engine``), who
holds optimizer state (ZeRO 1/2 partition it), and the checkpoint format (DeepSpeed's). In fp32
the loss trajectory equals the native backend's (tests/test_deepspeed_backend.py).
"""
from __future__ import annotations

import torch

from ..cluster.preemption import NonFiniteStop, PreemptionWatch
from ..config import Config
from ..moe import comm
from ..train.checkpoint import check_compatible, prune_checkpoints, read_manifest, resolve_resume
from ..train.optim import clip_gradients, global_grad_norm
from ..train.parallel import ParallelGroups
from ..train.step import (LogWindow, StepStats, TrainResult, begin_step, finish_step, micro_batch_loss, my_part,
                          open_run_outputs, read_step, set_up_run, to_device)
from ..train.step_numbers import StepTimer
from .deepspeed_config import trainer_clips
from .deepspeed_engine import (build_engine, ensure_process_group, import_deepspeed, load_deepspeed_checkpoint,
                               save_deepspeed_checkpoint)


def _all_finite(loss: torch.Tensor, groups: ParallelGroups) -> bool:
    """Is ``loss`` finite on every rank? The flag is made where the loss lives, so the world
    all-reduce runs on the loss's device (NCCL on GPUs; a CPU tensor there would fail)."""
    bad_1 = (~torch.isfinite(loss.detach())).to(torch.float64).reshape(1)
    comm.all_reduce_sum(bad_1, groups.world_group)
    # Read per micro-batch, inherently: the engine cannot undo a backward once it ran (ZeRO-2
    # reduces gradients as they arrive), so the decision must come before engine.backward.
    return not bool(bad_1[0])


def train(cfg: Config, groups: ParallelGroups, device=torch.device("cpu"), data=None, log=print,
          preemption: PreemptionWatch | None = None) -> TrainResult:
    t = cfg.train
    deepspeed = import_deepspeed(device)
    groups = ensure_process_group(groups, cfg, device)
    run = set_up_run(cfg, groups, device, data)  # TF32 and deterministic kernels as in the native trainer
    run_dir, data, sampler, model, cfg_dict, cfg_hash = (run.run_dir, run.data, run.sampler, run.model,
                                                         run.cfg_dict, run.cfg_hash)
    engine = build_engine(deepspeed, cfg, groups, model)
    we_clip = trainer_clips(cfg)

    start = 0
    resume_from = resolve_resume(run_dir, t.resume, groups, log)  # damaged checkpoints are skipped
    if resume_from is not None:
        changed = check_compatible(read_manifest(resume_from), cfg_dict, resume_from)
        state = load_deepspeed_checkpoint(engine, model, resume_from, groups, cfg_dict)
        sampler.load_state_dict(state["sampler"])
        start = state["step"]
        if groups.is_main:
            log(f"resumed from {resume_from} at step {start}" + (f" (changed: {', '.join(changed)})" if changed else ""))
    metrics, progress = open_run_outputs(cfg, groups, run_dir, start)
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    losses, val_loss = [], None

    def save(step_done: int, wait: bool = True) -> None:  # DeepSpeed's own writer: always blocking
        save_deepspeed_checkpoint(engine, model, run_dir, step_done, groups,
                                  {"step": step_done, "sampler": sampler.state_dict()}, cfg_dict, cfg_hash)
        if groups.is_main:
            prune_checkpoints(run_dir, t.keep_last, protected=resume_from)

    window, timer = LogWindow(t.log_every), StepTimer(device)
    for step in range(start, t.steps):
        timer.start()
        gatepro_on, lr = begin_step(cfg, step, model, engine.optimizer)

        step_stats, grad_norm = StepStats(), None
        ce_sum = torch.zeros((), dtype=torch.float64, device=device)  # read once, in read_step
        parts = my_part(sampler.global_batch(step), t.grad_accum, groups)
        for micro, part in enumerate(parts):
            inputs, targets = data.train.batch(part)
            inputs, targets = to_device(inputs, device), to_device(targets, device)
            timer.mark("data_s")
            ce, loss, stats = micro_batch_loss(engine, inputs, targets)
            if not _all_finite(loss, groups):
                # The engine has already taken earlier micro-batches' gradients (ZeRO-2 reduces
                # them as they arrive), so unlike the native trainer it cannot drop this step.
                raise NonFiniteStop(
                    f"non-finite loss at step {step + 1}; the deepspeed backend stops on it (its engine "
                    "cannot skip a step); resume from the last checkpoint with a lower train.lr")
            engine.backward(loss)  # scales by 1/grad_accum; reduces gradients on the last micro-batch
            timer.mark("fwd_bwd_s")
            if we_clip and micro == len(parts) - 1:
                grad_norm = global_grad_norm(model, groups)
                clip_gradients(model, grad_norm, t.grad_clip)
            engine.step()
            timer.mark("optimizer_s")
            step_stats.add(stats)
            ce_sum += ce.detach().to(torch.float64)
        sampler.step = step + 1
        if grad_norm is None:
            grad_norm = torch.tensor(float(engine.get_global_grad_norm() or 0.0), dtype=torch.float64)
        for layer, acc in zip(model.moe_layers, step_stats.layers or []):
            layer.router.update_bias(acc["counts"])
        readout = read_step(ce_sum, t.grad_accum, grad_norm, step_stats, groups)
        window.add(readout, tokens_per_step, timer.elapsed(), timer.split())
        losses.append(readout.loss)

        done = step + 1
        val_loss = finish_step(window, done, lr, gatepro_on, readout.finite, cfg, groups, device, model, data,
                               metrics, progress, preemption, save, run_dir, val_loss, eval_model=engine.module)

    progress.close()
    metrics.close()
    engine.destroy()  # its gradient hooks hold the engine and the model, and so our groups
    return TrainResult(t.steps, losses, val_loss, run_dir)

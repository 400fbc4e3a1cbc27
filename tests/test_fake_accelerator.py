"""The whole native training step on a device that is not the CPU, checked on a machine without a
GPU: the fake accelerator of ``tests/fake_accelerator.py`` (``fgpu``, fake tensors) and the fake
process group (``torch.testing._internal.distributed.fake_pg``) play one rank of a world of 2 or 4.

What runs is the trainer itself, ``trainer.train`` for one step, in which statistics, evaluation
and the checkpoint are all due: the model built by ``set_up_run`` (and ``shard_model`` under
``parallel.dp_shard``), forward and loss under autocast, backward with the reducer that
``gradient_sync`` picks (``OverlappedGradReducer``, or FSDP2's reduce-scatters), the gradient norm,
``read_step``, clipping, the AdamW step ``numerics.adamw`` builds, the router similarity
statistics, evaluation, and the state a checkpoint saves (``checkpoint._state``). Test code wraps
a few of the trainer's functions to look at what they receive and return; every one of them still
runs. Layouts: ep 1, 2 and 4 (dp x ep = 2x2 too), ``dp_shard`` on and off, fp32 and bf16,
capacity (both drop policies) and dropless, activation checkpointing ``block``, 1 or 2 micro-batches.

Checked for every layout:

* no device mismatch (a CPU tensor meeting a device tensor fails, as on CUDA);
* nothing the step makes is left on the CPU: parameters, gradients, MoE statistics, the step's
  accumulators, loss, gradient norm, AdamW's moments, the checkpoint's tensors. AdamW's ``step``
  counters are on the CPU with the trainer's optimizer off CUDA (``foreach``): torch's own choice,
  so that reading them is no device sync; the fused optimizer of CUDA keeps them on the device
  (``test_a_resume_materialises_optimizer_state_on_the_device``);
* every host read, named by the function that makes it and counted by ``host_syncs`` (copies to
  the host and blocking copies to the device included), is the documented list
  (``documented_device_reads``), per layout:

  - ``_splits_to_host`` (moe/dispatch.py): one per MoE layer forward when ep > 1 or a capacity is
    set -- ``all_to_all_single`` takes its split sizes as host integers: inherent;
  - ``swiglu_loop`` (moe/experts.py): one per MoE layer forward at ep=1 dropless in fp32 only --
    ``grouped_mm`` has no sync-free fp32 kernel on a GPU, and the expert loop needs the rows per
    expert (ep > 1 or capacity: they come with the split sizes; bf16: grouped GEMM, no read);
  - with activation checkpointing ``block`` each of those again in backward, when the block is
    recomputed (the recomputed dispatch reads its split sizes again; saving the forward's would
    spare it);
  - ``read_step`` (train/readout.py): one per step, every number of the step in one copy;
  - ``router_similarity``: one per statistics step; ``evaluate``: one per evaluation, for all of
    its batches (plus each evaluation forward's reads above).

  Reads of host memory, no device sync and not counted: ``host_all_reduce`` (evaluation's mean
  over the world) and ``host_all_gather_ints`` (capacity: each rank's token count) over gloo's
  host tensors, and torch's ``_get_value`` of AdamW's host step counters (``foreach`` only).

Where the fake device cannot go: ``device.type == "cuda"`` branches (``numerics.adamw``'s fused
choice -- built directly in the resume test --, ``set_numerics``' TF32, ``to_device``'s pinning,
``expert_kernel``'s capability check); C++ paths that read host memory (gloo, DCP's file I/O:
``save_checkpoint``/``load_checkpoint`` are replaced by ``_state``, which builds exactly the tensors
DCP would write or fill in); values (a fake tensor has none, so each read above is answered by the
test -- split sizes that add up, zeros for the step's numbers, hence a finite step -- and the
non-finite path, ``locate_non_finite``, whose ``nonzero()`` has a data-dependent shape, is not run);
``train.async_save`` (its background writer is DCP again).

Bugs these tests fail on: a checkpoint load that made AdamW's ``step`` on the CPU for CUDA's fused
optimizer (fixed in af98514), router similarity computed from this rank's FSDP shard of the router
(fixed in b800e71; the dp > 1 layouts under ``dp_shard``), a batch copied to the device with a
blocking copy (fixed in 8b4cd32), and a checkpoint saved after an evaluation under ``dp_shard``
that lacked the root's AdamW state (``_state`` took the parameters before ``state_dict()``, whose
FSDP hook reshards the root that FSDP2 leaves unsharded after a forward without backward).
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from functools import cache

import pytest
import torch

from fake_accelerator import (DEVICE_TYPE, FakeReads, UndocumentedHostRead, answer_zeros, fake_process_group,
                              fake_tensors, install)
from host_syncs import count_host_syncs
from test_trainer import tiny_config
from gatepro_dist.moe.comm import local_tensor
from gatepro_dist.train import trainer
from gatepro_dist.train.checkpoint import MOMENTS, _state
from gatepro_dist.train.model import Transformer
from gatepro_dist.train.numerics import adamw
from gatepro_dist.train.optim import param_groups
from gatepro_dist.train.parallel import build_parallel_groups
from gatepro_dist.train.sharding import shard_model

MOE_LAYERS = 2  # tiny_config: both layers are MoE layers

@dataclass(frozen=True)
class Layout:
    world: int
    rank: int  # the rank this process plays
    ep: int
    dp_shard: bool = False
    dtype: str = "fp32"
    capacity: str | None = None  # None: dropless; else the drop policy
    checkpointing: str = "none"
    grad_accum: int = 1
    router: tuple[str, ...] = ()  # router overrides: a reading of GatePro other than the default

    def overrides(self) -> list[str]:
        moe = [] if self.capacity is None else ["moe.capacity_factor=1.0", f"moe.drop_policy={self.capacity}"]
        return [f"parallel.ep={self.ep}", f"parallel.dp_shard={self.dp_shard}", f"train.dtype={self.dtype}",
                f"train.activation_checkpointing={self.checkpointing}", f"train.grad_accum={self.grad_accum}",
                "train.steps=1", "train.stats_every=1", "train.eval_every=1", "train.eval_batches=1", *moe,
                *self.router]


LAYOUTS = {
    "ep1-fp32-dropless-accum2": Layout(2, 1, ep=1, grad_accum=2),
    "ep1-fsdp-bf16-dropless": Layout(2, 0, ep=1, dp_shard=True, dtype="bf16"),
    "ep2-fp32-capacity": Layout(2, 1, ep=2, capacity="position"),
    "ep2-fsdp-bf16-block": Layout(2, 1, ep=2, dp_shard=True, dtype="bf16", checkpointing="block"),
    "ep4-bf16-probs-block": Layout(4, 3, ep=4, dtype="bf16", capacity="probs", checkpointing="block"),
    "ep4-fsdp-fp32-dropless": Layout(4, 2, ep=4, dp_shard=True),
    "dp2xep2-fsdp-fp32-capacity-block-accum2": Layout(4, 3, ep=2, dp_shard=True, capacity="position",
                                                      checkpointing="block", grad_accum=2),
    "dp2xep2-bf16-dropless-accum2": Layout(4, 1, ep=2, dtype="bf16", grad_accum=2),
    # the readings of GatePro (the placebo's rivals are a buffer that must reach the device)
    "ep2-bf16-mask-random-probs-bf16logits": Layout(
        2, 0, ep=2, dtype="bf16", router=("router.gatepro.mode=mask", "router.gatepro.pairing=random",
                                          "router.gatepro.space=probs", "router.logit_precision=bf16")),
    "ep1-fsdp-fp32-penalty-bf16_fp32_penalty": Layout(
        2, 1, ep=1, dp_shard=True, router=("router.logit_precision=bf16_fp32_penalty",)),
}


def documented_device_reads(layout: Layout) -> list[str]:
    """The device reads of the run's one step, in order (see the module docstring)."""
    if layout.ep > 1 or layout.capacity is not None:
        per_forward = ["_splits_to_host"]
    else:
        per_forward = ["swiglu_loop"] if layout.dtype == "fp32" else []
    forward = per_forward * MOE_LAYERS
    recomputed = forward if layout.checkpointing == "block" else []
    micro_batch = forward + recomputed
    evaluation = forward  # eval_batches=1, no gradients: nothing recomputed
    return micro_batch * layout.grad_accum + ["read_step", "router_similarity"] + evaluation + ["evaluate"]


HOST_MEMORY_READS = {"host_all_reduce", "host_all_gather_ints", "_get_value"}


# ---- what a fake device answers for each documented read ----------------------------------------

def _spread(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _split_sizes(tensor, frame):
    """Rows to send to each EP rank, rows received from each, rows per local expert: this rank's
    assignments spread evenly, one dropped when a capacity is set (so the drop path runs)."""
    ranks, local_experts = frame.f_locals["send_RE"].shape
    plan = frame.f_back.f_locals  # plan_dispatch
    kept = plan["expert_A"].numel() - (plan["capacity_factor"] is not None)
    per_rank = _spread(kept, ranks)
    return (per_rank + per_rank + _spread(kept, local_experts))[: tensor.numel()]


ANSWERS = {
    "_splits_to_host": _split_sizes,
    "swiglu_loop": lambda tensor, frame: _spread(frame.f_locals["x_MD"].shape[0], tensor.numel()),
    "read_step": answer_zeros,  # a loss of 0 and a finite gradient norm: the update is applied
    "router_similarity": answer_zeros,
    "evaluate": answer_zeros,
    "host_all_reduce": lambda tensor, frame: list(frame.f_locals["values"]),
    "host_all_gather_ints": lambda tensor, frame: [list(frame.f_locals["values"])] * tensor.shape[0],
    "_get_value": lambda tensor, frame: 1.0,  # AdamW's step count (a bias correction divides by 1 - beta^step)
}


# ---- one run of the trainer, looked at ------------------------------------------------------------

@dataclass
class Run:
    reads: list = field(default_factory=list)  # fake_accelerator.Read, in order
    counts: Counter = field(default_factory=Counter)  # host_syncs' counts
    off_device: list[str] = field(default_factory=list)  # "what (device)" of every tensor not on fgpu
    similarity_inputs: list[tuple] = field(default_factory=list)  # shapes the similarity statistics saw
    saved: dict = field(default_factory=dict)  # checkpoint key -> device type
    reducer: str = ""  # the class gradient_sync chose
    clipped: int = 0  # clip_gradients calls
    parameter_names: list[str] = field(default_factory=list)
    layout: Layout | None = None


class _OnDevice(Transformer):
    """The trainer's model, made on the device rather than moved there: ``Module.to`` swaps fake
    parameters for new objects (torch does so for every ``FakeTensor``), which would drop the
    ``expert_parallel`` flag; on CUDA ``.to`` keeps the parameter objects. Same model otherwise."""

    def to(self, *args, **kwargs):
        return self


def _model_builder(device, built: list):
    def build(cfg, ep_group=None, balance_group=None):
        with torch.device(device):
            model = _OnDevice(cfg, ep_group, balance_group)
        built.append(model)
        return model
    return build


def _check(run: Run, what: str, tensors) -> None:
    for name, t in tensors:
        if isinstance(t, torch.Tensor):
            device = local_tensor(t).device.type
            if device != DEVICE_TYPE:
                run.off_device.append(f"{what} {name} ({device})")


@cache
def _data():
    from gatepro_dist.train.step import load_data
    return load_data(tiny_config("/unused"))


def run_training(layout: Layout, run_dir: str) -> Run:
    """One step of ``trainer.train`` as ``layout.rank`` of a fake world, on the fake device."""
    device = install()
    run, built, optimizers = Run(layout=layout), [], []
    cfg = tiny_config(run_dir, *layout.overrides(), world_size=layout.world)

    def watch_micro_batch(forward, inputs_BS, targets_BS):
        ce, loss, stats = real["micro_batch_loss"](forward, inputs_BS, targets_BS)
        _check(run, "batch", [("inputs", inputs_BS), ("targets", targets_BS), ("ce", ce), ("loss", loss)])
        for i, s in enumerate(stats):
            _check(run, f"MoEStats[{i}]", vars(s).items())
        return ce, loss, stats

    def watch_read_step(loss_sum, grad_accum, grad_norm, step_stats, groups):
        model = built[0]
        _check(run, "step", [("loss_sum", loss_sum), ("grad_norm", grad_norm),
                             ("finite_outputs_L", model.finite_outputs_L)])
        for i, acc in enumerate(step_stats.layers):
            _check(run, f"StepStats[{i}]", acc.items())
        _check(run, "parameter", model.named_parameters())
        _check(run, "gradient", ((n, p.grad) for n, p in model.named_parameters()))
        return real["read_step"](loss_sum, grad_accum, grad_norm, step_stats, groups)

    def watch_gradient_sync(model, groups):
        reducer = real["gradient_sync"](model, groups)
        run.reducer = type(reducer).__name__
        return reducer

    def watch_clip(model, total_norm, max_norm):
        run.clipped += 1
        _check(run, "clip", [("total_norm", total_norm)])
        return real["clip_gradients"](model, total_norm, max_norm)

    def watch_adamw(params, t, device_):
        optimizer = real["adamw"](params, t, device_)
        optimizers.append(optimizer)
        return optimizer

    def save_state_instead(run_dir_, step, model, optimizer, groups, *rest):
        # DCP's file I/O cannot run on fake tensors: what it would write is _state's tensors.
        for key, t in _state(model, optimizer, groups, materialize=False).items():
            run.saved[key] = local_tensor(t).device.type

    def watch_similarity(weight_ND):
        run.similarity_inputs.append(tuple(weight_ND.shape))
        _check(run, "router weight", [("for similarity", weight_ND)])
        return real["gate_similarity_stats"](weight_ND)

    from gatepro_dist.moe import routing
    real = {"micro_batch_loss": trainer.micro_batch_loss, "read_step": trainer.read_step, "adamw": trainer.adamw,
            "gradient_sync": trainer.gradient_sync, "clip_gradients": trainer.clip_gradients,
            "gate_similarity_stats": routing.gate_similarity_stats}
    set_up_module = sys.modules[trainer.set_up_run.__module__]
    similarity_users = [m for name, m in list(sys.modules.items())
                        if name.startswith("gatepro_dist.train") and hasattr(m, "gate_similarity_stats")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(set_up_module, "Transformer", _model_builder(device, built))
        # The data prefetch thread runs outside the fake mode (dispatch modes are thread-local): its
        # real CPU batches would be constant-folded by FakeTensorMode onto a device with no kernels.
        # Batches are read on the training thread instead; the prefetcher is tested in test_data_sources.
        patch.setattr(set_up_module, "PrefetchingView", lambda view, *args, **kwargs: view)
        patch.setattr(trainer, "micro_batch_loss", watch_micro_batch)
        patch.setattr(trainer, "read_step", watch_read_step)
        patch.setattr(trainer, "adamw", watch_adamw)
        patch.setattr(trainer, "gradient_sync", watch_gradient_sync)
        patch.setattr(trainer, "clip_gradients", watch_clip)
        patch.setattr(trainer, "save_checkpoint", save_state_instead)
        for module in similarity_users:
            patch.setattr(module, "gate_similarity_stats", watch_similarity)
        with fake_process_group(layout.world, layout.rank):
            groups = build_parallel_groups(layout.ep, DEVICE_TYPE, layout.dp_shard)
            with fake_tensors(), FakeReads(ANSWERS) as reads, count_host_syncs(cpu_is_device=False) as counts:
                trainer.train(cfg, groups, device, data=_data(), log=lambda *_: None)
                model, optimizer = built[0], optimizers[0]
                _check(run, "parameter after the step", model.named_parameters())
                for name, p in model.named_parameters():
                    slot = optimizer.state.get(p, {})
                    _check(run, f"AdamW state of {name}", ((m, slot.get(m)) for m in MOMENTS))
                    if "step" in slot and slot["step"].device.type != "cpu":
                        run.off_device.append(f"AdamW step of {name} is on {slot['step'].device}, torch's "
                                              "foreach AdamW keeps it on the CPU")
    run.reads, run.counts = reads.log, counts
    run.parameter_names = [n for n, _ in model.named_parameters()]
    return run


_runs: dict[str, Run] = {}


@pytest.fixture
def trained(tmp_path_factory):
    """``trained(layout_id)``: the run of that layout (each layout runs once per session)."""
    def get(layout_id: str) -> Run:
        if layout_id not in _runs:
            _runs[layout_id] = run_training(LAYOUTS[layout_id], str(tmp_path_factory.mktemp(layout_id)))
        return _runs[layout_id]
    return get


# ---- the step, layout by layout ------------------------------------------------------------------

@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_the_whole_step_runs_on_the_device_and_leaves_nothing_on_the_cpu(trained, layout_id):
    run = trained(layout_id)
    saved_off_device = [f"{key} ({device})" for key, device in run.saved.items()
                        if device != DEVICE_TYPE and not (key.startswith("optim.") and key.endswith(".step"))]
    assert run.off_device == [] and saved_off_device == []
    assert {d for k, d in run.saved.items() if k.endswith(".step")} <= {"cpu"}  # foreach: host counters
    # Both reducers ran (the overlapped one on its device path: asynchronous all-reduces, which a
    # CPU run never takes), and the finite step was clipped and applied.
    assert run.reducer == ("FsdpGradSync" if run.layout.dp_shard else "OverlappedGradReducer")
    assert run.clipped == 1
    # Router similarity sees every row of every MoE layer's router, also under dp_shard (FSDP keeps
    # only a shard of it between forwards).
    assert run.similarity_inputs == [(8, 32)] * MOE_LAYERS  # num_experts x d_model


@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_the_step_reads_the_host_only_where_documented(trained, layout_id):
    run = trained(layout_id)
    device_reads = [r.site for r in run.reads if r.device == DEVICE_TYPE]
    assert device_reads == documented_device_reads(run.layout)
    # Counted by the counter the rest of the suite uses: one per read, and no copy either way but
    # the placebo's rivals (pairing random), drawn on the host by each router reset at build: here
    # the model is built on the device, in a real run on the CPU and moved with the model's .to.
    build_copies = 2 * MOE_LAYERS if "router.gatepro.pairing=random" in run.layout.router else 0
    assert run.counts == Counter(tolist=len(device_reads), h2d_blocking=build_copies)
    host_reads = {r.site for r in run.reads if r.device == "cpu"}
    assert host_reads <= HOST_MEMORY_READS and "_get_value" in host_reads


@pytest.mark.parametrize("layout_id", [
    "ep2-fp32-capacity",
    "ep2-fsdp-bf16-block",
])
def test_a_checkpoint_saved_after_evaluation_holds_every_parameters_optimizer_state(trained, layout_id):
    """The run's one step ends with an evaluation and then the checkpoint (the last step always
    does): every parameter's AdamW state must be in it, or resuming from it fails."""
    run = trained(layout_id)
    missing = [name for name in run.parameter_names
               if not all(f"optim.{name}.{part}" in run.saved for part in ("step", *MOMENTS))]
    assert missing == []


# ---- resuming: the optimizer state a checkpoint load fills in ------------------------------------

@pytest.mark.parametrize("dp_shard", [False, True], ids=["replicated", "fsdp"])
@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_a_resume_materialises_optimizer_state_on_the_device(kind, dp_shard):
    """``load_checkpoint`` first makes AdamW's state with ``_state(..., materialize=True)`` for DCP to
    load into, in place; then training steps with it. DCP's file I/O cannot run on fake tensors:
    the tensors it would fill are checked, and one optimizer step taken with them.

    ``fused`` is the optimizer ``numerics.adamw`` builds on CUDA (asked for here with a CUDA device
    type: the fake device is not ``cuda``); its kernel reads ``step`` on the device without checking
    where it is. ``foreach`` is what it builds elsewhere: torch keeps ``step`` in host memory."""
    device = install()
    cfg = tiny_config("/unused", "parallel.ep=2", f"parallel.dp_shard={dp_shard}", world_size=2)
    with fake_process_group(2, 1):
        groups = build_parallel_groups(2, DEVICE_TYPE, dp_shard)
        with fake_tensors(), FakeReads(ANSWERS) as reads, count_host_syncs(cpu_is_device=False) as counts:
            with torch.device(device):
                model = Transformer(cfg, groups.ep_group, groups.edp_group)
            if dp_shard:
                shard_model(model, cfg, groups)
            optimizer = adamw(param_groups(model, cfg.train.weight_decay), cfg.train,
                              torch.device("cuda" if kind == "fused" else DEVICE_TYPE))
            state = _state(model, optimizer, groups, materialize=True)
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
    step_device = DEVICE_TYPE if kind == "fused" else "cpu"
    expected = {key: step_device if key.endswith(".step") else DEVICE_TYPE for key in state}
    assert {key: local_tensor(t).device.type for key, t in state.items()} == expected
    stepped = {f"{name}.{part}": local_tensor(t).device.type
               for name, p in model.named_parameters() for part, t in optimizer.state[p].items()}
    assert stepped == {key: step_device if key.endswith(".step") else DEVICE_TYPE for key in stepped}
    assert len(stepped) == 3 * len(list(model.parameters()))
    # The update reads nothing from the device (foreach reads its host counters).
    assert sum(counts.values()) == 0
    assert {r.site for r in reads.log} == (set() if kind == "fused" else {"_get_value"})


# ---- the fake device itself -----------------------------------------------------------------------

def test_the_fake_device_refuses_a_cpu_tensor_like_a_gpu():
    device = install()
    with fake_tensors():
        on_device = torch.ones(4, device=device)
        with pytest.raises(Exception, match="device"):
            on_device + torch.ones(4)  # a CPU tensor that is not a 0-dim scalar
        assert (on_device + torch.ones(())).device.type == DEVICE_TYPE  # CPU scalars mix, as on CUDA


def test_autograd_and_autocast_run_on_the_fake_device():
    device = install()
    with fake_tensors():
        w = torch.ones(8, 8, device=device, requires_grad=True)
        with torch.autocast(DEVICE_TYPE, dtype=torch.bfloat16):
            y = torch.ones(4, 8, device=device) @ w
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and w.grad.device.type == DEVICE_TYPE and w.grad.dtype == torch.float32


def test_a_read_the_test_does_not_document_fails():
    from gatepro_dist.moe.experts import swiglu_loop

    device = install()
    with fake_tensors(), FakeReads({}) as reads:
        x_MD, counts_E = torch.ones(6, 4, device=device), torch.ones(3, dtype=torch.long, device=device)
        with pytest.raises(UndocumentedHostRead, match="swiglu_loop"):  # the loop reads its split sizes
            swiglu_loop(x_MD, torch.ones(3, 4, 10, device=device), torch.ones(3, 5, 4, device=device), counts_E)
    assert [(r.site, r.kind, r.device) for r in reads.log] == [("swiglu_loop", "tolist", DEVICE_TYPE)]

"""Host-device synchronisations, counted (tests/host_syncs.py; a count, never a time).

Per MoE layer: at most one host read per forward -- the all-to-all split sizes, which
``all_to_all_single`` takes as host integers -- and none in backward, with GatePro on, dropless
and with a capacity (both drop policies), at ep 1 in process and ep 2 / 4 (and dp 2 x ep 2, where
the statistics are also summed over the expert-data-parallel group) on real gloo groups.
Per training step: one read, plus at ep > 1 the layers' split sizes, whatever the number of
parameters. Before this work one layer forward made 11 reads at ep=1 and 13 at ep 2/4 dropless
(13 / 15 with a capacity), counting bincount, and a step with 2 micro-batches made 73 (2 layers)
and 137 (4 layers) at ep=1, 81 and 153 at ep=2 -- besides one ``.cpu()`` per parameter in the
gradient norm, which a CPU-only run cannot see.

Copies between the host and a device are syncs too (``to_host``, and blocking copies to the device
as ``h2d_blocking``): counted where a second device exists, the fake accelerator of
``tests/fake_accelerator.py`` (the tests at the end; a CPU-to-CPU copy is never counted, so the
counts above hold). The whole training step on that device, with every read named and counted, is
``tests/test_fake_accelerator.py``.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distributed import run_on_ranks
from gatepro_dist.moe.layer import MoELayer, MoESpec
from fake_accelerator import FakeReads, answer_zeros, fake_device, fake_tensors, install  # noqa: F401  (a fixture)
from host_syncs import count_host_syncs, not_counted

CASES = {
    "dropless": dict(),
    "capacity-position": dict(capacity_factor=1.0, drop_policy="position"),
    "capacity-probs": dict(capacity_factor=0.75, drop_policy="probs"),
}


def layer_syncs(ep_group, balance_group, rank: int) -> dict[str, tuple[int, int, int]]:
    """(forward reads, backward reads, dropped assignments) of one layer call per case."""
    out = {}
    for name, moe in CASES.items():
        spec = MoESpec(hidden_size=16, num_experts=8, top_k=2, expert_ffn_dim=12, num_shared_experts=1,
                       gatepro=True, penalty=0.05, **moe)
        layer = MoELayer(spec, ep_group, balance_group)
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(rank)).requires_grad_()
        with count_host_syncs() as forward:
            y, stats = layer(x)
        with count_host_syncs() as backward:
            (y.square().sum() + stats.loss).backward()
        assert int(stats.gatepro_penalised) > 0  # GatePro really ran
        out[name] = (sum(forward.values()), sum(backward.values()), int(stats.dropped_tokens))
    return out


READINGS = {  # GatePro's readings (moe/competition.py) other than the default
    "mask-similar": dict(gatepro_mode="mask"),
    "mask-random-probs-bf16": dict(gatepro_mode="mask", gatepro_pairing="random", gatepro_space="probs",
                                   logit_precision="bf16"),
    "penalty-probs-bf16_fp32_penalty": dict(gatepro_space="probs", logit_precision="bf16_fp32_penalty"),
    "penalty-random-bf16": dict(gatepro_pairing="random", logit_precision="bf16"),
}


@pytest.mark.parametrize("reading", READINGS)
def test_every_reading_of_gatepro_reads_the_host_as_the_default_does(reading):
    """The readings and the new statistics (partner co-selection, the placebo's rivals) add no read."""
    for capacity, expected in ((None, (0, 0)), (1.0, (1, 0))):
        spec = MoESpec(hidden_size=16, num_experts=8, top_k=2, expert_ffn_dim=12, penalty=0.05,
                       capacity_factor=capacity, **READINGS[reading])
        layer = MoELayer(spec)
        x = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        with count_host_syncs() as forward:
            y, stats = layer(x)
        with count_host_syncs() as backward:
            (y.square().sum() + stats.loss).backward()
        assert int(stats.gatepro_penalised) > 0 and int(stats.partner_co_selected) >= 0  # the reading ran
        assert (sum(forward.values()), sum(backward.values())) == expected


def test_layer_at_ep1_reads_the_host_only_for_capacity_splits():
    counts = layer_syncs(None, None, 0)
    # Dropless at ep=1 every assignment stays: the split sizes are known without a read.
    assert {name: c[:2] for name, c in counts.items()} == {
        "dropless": (0, 0), "capacity-position": (1, 0), "capacity-probs": (1, 0)}
    assert counts["capacity-probs"][2] > 0  # the capacity path really dropped


def _layer_worker(rank: int, world: int, ep: int) -> dict:
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(i, world, ep))) for i in range(ep)]
    balance = edp_groups[rank % ep] if world > ep else None
    return layer_syncs(ep_groups[rank // ep], balance, rank)


@pytest.mark.parametrize("world,ep", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_layer_forward_reads_the_host_once_and_backward_never(world, ep):
    for rank, counts in enumerate(run_on_ranks(world, _layer_worker, ep)):
        for name, (forward, backward, _) in counts.items():
            assert (forward, backward) == (1, 0), f"rank {rank} {name}: {forward} forward, {backward} backward reads"


def _syncs_of_training(tmp_path, layers: int, steps: int, ep: int = 1, world: int = 1, dp_shard: bool = False) -> int:
    from test_trainer import tiny_config
    from gatepro_dist.train.parallel import build_parallel_groups
    from gatepro_dist.train.trainer import train

    cfg = tiny_config(f"{tmp_path}/L{layers}-s{steps}", f"model.n_layers={layers}", f"train.steps={steps}",
                      f"parallel.ep={ep}", "train.save_every=1000", "train.stats_every=1000", "train.grad_accum=2",
                      f"parallel.dp_shard={dp_shard}", world_size=world)
    step = torch.optim.AdamW.step

    def step_not_counted(self, *args, **kwargs):  # see host_syncs.not_counted
        with not_counted():
            return step(self, *args, **kwargs)

    torch.optim.AdamW.step = step_not_counted
    try:
        with count_host_syncs() as counts:
            train(cfg, build_parallel_groups(ep, "cpu", dp_shard), log=lambda *_: None)
    finally:
        torch.optim.AdamW.step = step
    return sum(counts.values())


@pytest.mark.slow
def test_a_training_step_reads_the_host_a_constant_number_of_times(tmp_path):
    """One step's reads = a run of 3 steps minus a run of 2 (start-up and the last step's
    evaluation, similarity and checkpoint are in both). 2 and 4 MoE layers, 2 micro-batches."""
    per_step = {layers: _syncs_of_training(tmp_path, layers, 3) - _syncs_of_training(tmp_path, layers, 2)
                for layers in (2, 4)}
    assert per_step[2] == per_step[4] == 1, per_step  # read_step's one batched copy


def _training_worker(rank: int, world: int, tmp_path: str, layers: int, steps: int, dp_shard: bool = False) -> int:
    return _syncs_of_training(tmp_path, layers, steps, ep=world, world=world, dp_shard=dp_shard)


@pytest.mark.slow
def test_at_ep2_a_step_adds_only_each_layer_forwards_split_sizes(tmp_path):
    """At ep=2 a step reads the host once plus once per MoE layer forward (2 micro-batches)."""
    for layers in (2, 4):
        runs = {steps: run_on_ranks(2, _training_worker, str(tmp_path / f"{steps}"), layers, steps)
                for steps in (2, 3)}
        per_step = [a - b for a, b in zip(runs[3], runs[2])]
        assert per_step == [1 + layers * 2] * 2, (layers, per_step)


@pytest.mark.slow
def test_under_dp_shard_a_step_reads_the_host_as_often_as_replicated(tmp_path):
    """FSDP2's gathers and reduce-scatters add no host read: at ep=2 a step still reads once plus
    once per MoE layer forward (2 micro-batches)."""
    runs = {steps: run_on_ranks(2, _training_worker, str(tmp_path / f"{steps}"), 2, steps, True) for steps in (2, 3)}
    assert [a - b for a, b in zip(runs[3], runs[2])] == [1 + 2 * 2] * 2


# ---- copies between the host and a device ----------------------------------------------------------
# They need a device that is not the CPU: the fake accelerator (tests/fake_accelerator.py).

def _on_device_reads():
    # Reads made by this module (the lambdas below) are answered with zeros.
    return FakeReads({"<lambda>": answer_zeros}, packages=(__name__,))


@pytest.mark.parametrize("copy", [
    lambda t: t.cpu(),
    lambda t: t.to("cpu"),
    lambda t: t.to(torch.device("cpu"), torch.float64),
    lambda t: t.numpy(force=True),
    lambda t: torch.empty(3, dtype=t.dtype).copy_(t),
], ids=["cpu", "to-cpu", "to-cpu-float64", "numpy-force", "copy-into-host"])
def test_a_copy_to_the_host_counts_as_a_sync(fake_device, copy):
    device_tensor = torch.ones(3, device=fake_device)
    with _on_device_reads(), count_host_syncs() as counts:
        copy(device_tensor)
    assert counts == {"to_host": 1}


@pytest.mark.parametrize("copy,blocking", [
    (lambda h, d: h.to(d), True),
    (lambda h, d: torch.empty(3, device=d).copy_(h), True),
    (lambda h, d: h.to(d, non_blocking=True), False),
    (lambda h, d: torch.empty(3, device=d).copy_(h, non_blocking=True), False),
], ids=["to", "copy-into-device", "to-non-blocking", "copy-non-blocking"])
def test_a_blocking_copy_to_the_device_is_counted_apart(fake_device, copy, blocking):
    host_tensor = torch.ones(3)
    with count_host_syncs() as counts:
        copy(host_tensor, fake_device)
    assert counts == ({"h2d_blocking": 1} if blocking else {})


def test_copies_from_host_to_host_are_not_syncs():
    """The CPU-only runs above count none of these: a CPU run moves nothing between devices."""
    t = torch.ones(3)
    with count_host_syncs() as counts:
        t.cpu(), t.to("cpu"), t.to(torch.float64), t.numpy(), torch.empty(3).copy_(t), t.clone()
    assert counts == {}


def _read(vector: torch.Tensor, scalar: torch.Tensor):
    return vector.tolist(), scalar.item()


def test_with_a_device_the_host_memorys_own_reads_are_not_syncs():
    """``cpu_is_device=False``: reading a CPU tensor is host memory (AdamW's step counter, a gloo
    exchange); reading a device tensor is a sync, one per ``tolist`` however long the list."""
    host, host_scalar = torch.arange(4), torch.tensor(6)  # real CPU tensors, made before the fake device is on
    with fake_tensors(), FakeReads({"_read": answer_zeros}, packages=(__name__,)) as reads:
        device = install()
        with count_host_syncs(cpu_is_device=False) as counts:
            host_values = _read(host, host_scalar)
            _read(torch.ones(4, device=device), torch.ones((), device=device))
    assert host_values == ([0, 1, 2, 3], 6)  # read as they are
    assert counts == {"tolist": 1, "item": 1}
    assert [(r.kind, r.device) for r in reads.log] == [("tolist", "fgpu"), ("item", "fgpu")]
    with count_host_syncs() as on_this_machine:  # the CPU plays the device: every read counts
        _read(host, host_scalar)
    assert on_this_machine == {"tolist": 1, "item": 1}


def test_the_counter_finds_a_copy_per_parameter_in_a_gradient_norm(fake_device):
    """The gradient norm once moved each parameter's norm to the host (a sync per parameter,
    invisible on this machine without a second device); today's reads nothing."""
    from gatepro_dist.train.optim import global_grad_norm
    from gatepro_dist.train.parallel import single_process_groups

    with torch.device(fake_device):
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with count_host_syncs() as old_way:
        torch.stack([p.grad.norm().cpu() for p in model.parameters()]).norm()
    with count_host_syncs() as today:
        norm = global_grad_norm(model, single_process_groups())
    assert old_way == {"to_host": 4}
    assert today == {} and norm.device.type == fake_device.type

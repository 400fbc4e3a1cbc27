"""``parallel.dp_shard``: FSDP2 over the world for dense parameters and over EDP for experts, on
real gloo groups of 2 and 4 ranks, against the replicated single process.

AdamW hardly sees the scale of a gradient, so loss trajectories alone would miss an expert
gradient ep times too large: the gradients of every parameter are compared directly.
"""
from __future__ import annotations

import pytest
import torch

from distributed import run_on_ranks
from gatepro_dist.train.checkpoint import latest_checkpoint
from test_trainer import assert_close_lists, run_training, tiny_config

FSDP = "parallel.dp_shard=true"


def _gradients_and_bytes(rank: int, world: int, overrides: list[str]) -> dict:
    """One forward and backward on a fixed global batch (each rank its slice); the full gradient
    of every parameter, and what this rank holds of parameters, gradients and AdamW state."""
    from gatepro_dist.moe.comm import local_tensor
    from gatepro_dist.moe.router import is_expert_parallel
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.numerics import adamw
    from gatepro_dist.train.optim import global_grad_norm, gradient_sync, param_groups
    from gatepro_dist.train.parallel import build_parallel_groups, single_process_groups
    from gatepro_dist.train.sharding import shard_model
    from gatepro_dist.train.step import router_similarity

    cfg = tiny_config("/tmp/unused", *overrides, world_size=world)
    groups = (build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard) if world > 1
              else single_process_groups())
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    if groups.dp_shard:
        shard_model(model, cfg, groups)
    sync = gradient_sync(model, groups)
    tokens = torch.randint(0, cfg.model.vocab_size, (8, 16), generator=torch.Generator().manual_seed(7))
    mine = tokens.chunk(world)[rank]
    logits, stats = model(mine)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), mine.roll(-1, 1).flatten())
    sync.arm(last_micro_batch=True)
    (loss + sum(s.loss for s in stats)).backward()
    sync.finish()
    norm = float(global_grad_norm(model, groups))
    similarity = router_similarity(model)  # after forward: FSDP has resharded the router rows

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    grads = {}
    for name, p in model.named_parameters():
        grad = full(p.grad)
        if is_expert_parallel(p) and not groups.dp_shard and groups.ep > 1:  # replicated: local rows
            grad = torch.cat(torch.distributed.nn.functional.all_gather(grad, group=groups.ep_group))
        grads[name.replace("_fsdp_wrapped_module.", "")] = grad
    optimizer = adamw(param_groups(model, 0.1), cfg.train, torch.device("cpu"))
    optimizer.step()

    def held(expert: bool) -> int:
        total = 0
        for p in model.parameters():
            if is_expert_parallel(p) == expert:
                state = optimizer.state[p]
                tensors = [p, p.grad, state["exp_avg"], state["exp_avg_sq"]]
                total += sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)
        return total

    expert_edp_dims = {p.placements[0].dim for p in model.parameters()
                       if is_expert_parallel(p) and groups.dp_shard}  # the EDP mesh dimension comes first
    return {"grads": grads, "norm": norm, "similarity": similarity, "dense_bytes": held(False), "expert_bytes": held(True),
            "expert_edp_dims": expert_edp_dims}


def test_dp_shard_layouts_follow_the_replicated_loss_trajectory(tmp_path):
    """With and without activation checkpointing: a checkpointed block (or MoE FFN) runs again
    in backward inside FSDP's unit, its all-to-alls and its experts' all-gather included."""
    steps = ["train.steps=5", "train.save_every=1000"]
    reference = run_training(1, tmp_path / "1x1", *steps)
    for world, ep, checkpointing in [(2, 1, "none"), (2, 2, "moe"), (4, 2, "none"), (4, 2, "block")]:
        losses = run_training(world, tmp_path / f"{world}x{ep}-{checkpointing}", *steps, f"parallel.ep={ep}", FSDP,
                              f"train.activation_checkpointing={checkpointing}")
        assert_close_lists(losses, reference)
    assert reference[-1] < reference[0]


@pytest.mark.parametrize("world,ep,experts,edp_dim", [(2, 2, 8, 0), (4, 2, 8, 0), (4, 1, 8, 0), (4, 2, 6, 1)])
def test_dp_shard_gradients_equal_the_single_process_gradients(world, ep, experts, edp_dim):
    """Every parameter's gradient, experts and router rows included, at EDP sizes 1, 2 and 4, and
    the router-similarity statistics, which need every router row on every rank. With
    6 experts at ep=2 each rank's 3 experts do not split over 2 EDP ranks: FSDP shards them on
    dimension 1 instead (``least_padding_placement``)."""
    reference = _gradients_and_bytes(0, 1, [f"moe.num_experts={experts}"])
    ranks = run_on_ranks(world, _gradients_and_bytes, [f"parallel.ep={ep}", FSDP, f"moe.num_experts={experts}"])
    for rank, result in enumerate(ranks):
        assert set(result["grads"]) == set(reference["grads"])
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"rank {rank}, {name}: {m}")
        assert result["norm"] == pytest.approx(reference["norm"], rel=1e-6)
        assert result["expert_edp_dims"] == {edp_dim}
        # The statistics see every router row, not this rank's FSDP shard (a shard has other
        # cosines, or fewer rows than the similarity matrix needs).
        assert len(result["similarity"]) == len(reference["similarity"]) == 2
        for ours, single in zip(result["similarity"], reference["similarity"]):
            assert ours == pytest.approx(single, rel=1e-5)


LAYOUTS = {  # name: (world size, overrides)
    "replicated ep=2 world 2": (2, ["parallel.ep=2"]),
    "FSDP ep=2 world 4": (4, ["parallel.ep=2", FSDP]),
    "FSDP ep=1 world 2": (2, ["parallel.ep=1", FSDP]),
    "replicated ep=1 world 1": (1, ["parallel.ep=1"]),
}


def _resume_each(rank: int, world: int, runs: list[tuple[str, list[str]]]) -> list[list[float]]:
    """Several training runs one after another in one process group (each resumes a checkpoint)."""
    from gatepro_dist.train.engine import train
    from gatepro_dist.train.parallel import build_parallel_groups

    losses = []
    for run_dir, overrides in runs:
        cfg = tiny_config(run_dir, *overrides, world_size=world)
        losses.append(train(cfg, build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard),
                            log=lambda *_: None).losses)
    return losses


def test_checkpoints_reshard_between_every_pair_of_replicated_and_fsdp_layouts(tmp_path):
    """Saved at A, resumed at B, for every A and B among four layouts, losses continuing the
    uninterrupted run (optimizer state included: a fresh AdamW would take another step). Experts
    move between EP sizes, between plain tensors and 2-D FSDP shards, and between FSDP shards cut
    on different dimensions (3 experts per rank at ep=2 are split on dimension 1 over 2 EDP ranks,
    6 at ep=1 on dimension 0).

    A at A resumes bit for bit, FSDP ep=2 included. That is where experts kept as plain local
    tensors go wrong without an error: both EP ranks save a tensor of the same name and shape,
    DCP keeps one, and after the reload half the ranks compute with the other half's experts
    (checked with the experts left as plain tensors: the loss after such a resume was 5.535
    instead of 5.437; resuming a replicated checkpoint into that layout fails on the shapes)."""
    common = ["train.steps=5", "train.save_every=1", "moe.num_experts=6"]
    reference = run_training(1, tmp_path / "reference", *common)  # replicated ep=1 world 1
    step_2 = tmp_path / "reference" / "checkpoints" / "step_00000002"
    saved_at_3 = {"replicated ep=1 world 1": tmp_path / "reference"}
    uninterrupted = {"replicated ep=1 world 1": reference[3:]}  # each layout's own steps 4 and 5
    for name, (world, overrides) in LAYOUTS.items():  # each layout continues from step 2, saving from step 3
        if name in saved_at_3:
            continue
        run_dir = tmp_path / name.replace(" ", "_")
        losses = run_training(world, run_dir, *common, *overrides, f"train.resume={step_2}")
        assert_close_lists(losses, reference[2:])
        saved_at_3[name], uninterrupted[name] = run_dir, losses[1:]

    for target, (world, overrides) in LAYOUTS.items():
        runs = [(str(tmp_path / f"{source}-to-{target}".replace(" ", "_")),
                 [*common, *overrides, f"train.resume={saved_at_3[source] / 'checkpoints' / 'step_00000003'}"])
                for source in LAYOUTS]
        if world == 1:
            results = [_resume_each(0, 1, [run])[0] for run in runs]
        else:
            results = run_on_ranks(world, _resume_each, runs)[0]
        for source, losses in zip(LAYOUTS, results):
            if source == target:
                assert losses == uninterrupted[target], f"{source} -> {target} must continue bit for bit"
            assert_close_lists(losses, reference[3:])


def _bf16_gathers(rank: int, world: int, run_dir: str) -> dict:
    """Train two bf16 steps under dp_shard, recording every FSDP all-gather's dtype and size."""
    import torch.distributed as dist

    from gatepro_dist.train.engine import train
    from gatepro_dist.train.parallel import build_parallel_groups

    # FSDP calls all_gather_single from torch 2.13 on, all_gather_into_tensor before
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    gathers, real_all_gather = [], getattr(dist, name)

    def recording_all_gather(output, input, *args, **kwargs):  # notes, then runs the real collective
        gathers.append((input.dtype, input.numel()))
        return real_all_gather(output, input, *args, **kwargs)

    setattr(dist, name, recording_all_gather)
    cfg = tiny_config(run_dir, "train.steps=2", "train.save_every=1000", "train.dtype=bf16", "parallel.ep=2",
                      FSDP, world_size=world)
    losses = train(cfg, build_parallel_groups(2, "cpu", True), log=lambda *_: None).losses
    return {"losses": losses, "gathers": gathers}


def test_dp_shard_bf16_gathers_bf16_weights_and_keeps_fp32_master_weights(tmp_path):
    """train.dtype=bf16 under dp_shard: FSDP gathers dense and expert weights in bf16 (half the
    bytes), the router's rows in fp32 (GatePro's 1e-4 must survive), keeps fp32 weights and AdamW
    state (as the checkpoint shows), and the loss moves from fp32 by bf16 rounding, not more."""
    from torch.distributed.checkpoint import FileSystemReader

    fp32 = run_training(1, tmp_path / "fp32", "train.steps=2", "train.save_every=1000")
    result = run_on_ranks(4, _bf16_gathers, str(tmp_path / "bf16"))[0]
    cfg = tiny_config(tmp_path / "x")
    router_rows_per_rank = cfg.moe.num_experts // 4 * cfg.model.d_model  # ep=2, then 2 EDP ranks
    fp32_gathers = [n for dtype, n in result["gathers"] if dtype == torch.float32]
    bf16_gathers = [n for dtype, n in result["gathers"] if dtype == torch.bfloat16]
    assert len(fp32_gathers) + len(bf16_gathers) == len(result["gathers"])
    assert fp32_gathers and set(fp32_gathers) == {router_rows_per_rank}, result["gathers"]
    assert len(bf16_gathers) > len(fp32_gathers)

    metadata = FileSystemReader(str(latest_checkpoint(tmp_path / "bf16"))).read_metadata()
    saved = {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()
             if key.startswith(("model.", "optim.")) and not key.endswith(".step")}
    assert saved and set(saved.values()) == {torch.float32}

    relative = [abs(a - b) / b for a, b in zip(result["losses"], fp32)]
    assert max(relative) < 2.0 ** -9, relative


def test_a_dp_shard_checkpoint_saved_after_evaluation_resumes(tmp_path):
    """The last step evaluates, then saves. FSDP2 leaves the root (embedding, final norm) unsharded
    after a forward without backward; the checkpoint must still hold the root's AdamW state (it
    lacked it before ``_state`` called ``state_dict()`` first: resuming failed with a missing
    ``optim.embed.weight.exp_avg``), and the resumed run continues the uninterrupted one."""
    common = ["parallel.ep=2", FSDP, "train.save_every=1000", "train.lr_schedule=constant"]
    run_training(2, tmp_path / "run", "train.steps=2", *common)  # evaluates at step 2, then saves
    resumed = run_training(2, tmp_path / "run", "train.steps=3", *common, "train.resume=auto")
    uninterrupted = run_training(2, tmp_path / "straight", "train.steps=3", *common)
    assert_close_lists(resumed, uninterrupted[2:], rel=1e-6)

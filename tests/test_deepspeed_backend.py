"""train.backend=deepspeed: the same losses and gradients as the native backend, and resumable checkpoints.

Real DeepSpeed 0.19.x engines on real gloo process groups (CPU). Every multi-process check runs in
one spawned job per world size (DeepSpeed's import and engine set-up dominate the time), whose
results several tests read.
"""
from __future__ import annotations

import json

import pytest

from distributed import run_on_ranks
from gatepro_dist.backends.deepspeed_config import deepspeed_config, generated_config, merge
from gatepro_dist.train.checkpoint import CheckpointError
from gatepro_dist.config import ConfigError, load_config
from gatepro_dist.config_checks import validate
from test_trainer import TINY, tiny_config

STAGES = (0, 1, 2)
STEPS = ["train.steps=5", "train.save_every=3", "parallel.ep=2"]


# ---- the generated DeepSpeed config -------------------------------------------------------

def _cfg(tmp_path, *overrides, world_size=2):
    return validate(load_config(None, [*TINY, f"train.run_dir={tmp_path / 'run'}", *overrides]), world_size)


def test_generated_config_follows_our_yaml(tmp_path):
    cfg = _cfg(tmp_path, "train.global_batch_size=16", "train.grad_accum=2", "deepspeed.zero_stage=2",
               "train.dtype=bf16", "train.grad_clip=0.5")
    ds = generated_config(cfg, world_size=2)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 4, 2)
    assert ds["zero_optimization"]["stage"] == 2
    # bf16 as the native trainer runs it: autocast over fp32 parameters, not a bf16 module
    assert ds["bf16"] == {"enabled": False}
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["gradient_clipping"] == 0.5  # ZeRO 1/2 clip with the true global norm themselves


def test_stage0_fp32_leaves_clipping_to_our_trainer(tmp_path):
    """DeepSpeed's stage-0 fp32 clip averages per-rank norms, which is wrong under EP (see deepspeed_config)."""
    assert generated_config(_cfg(tmp_path, "deepspeed.zero_stage=0"), 2)["gradient_clipping"] == 0.0


def test_user_json_is_merged_on_top(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 12345}, "communication_data_type": "fp32"}))
    ds = deepspeed_config(_cfg(tmp_path, "deepspeed.zero_stage=1", f"deepspeed.config_path={user}"), 2)
    assert ds["zero_optimization"] == {"stage": 1, "reduce_scatter": True, "contiguous_gradients": True,
                                       "overlap_comm": False, "reduce_bucket_size": 12345}
    assert ds["communication_data_type"] == "fp32"
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


@pytest.mark.parametrize("user, fragments", [
    ({"train_batch_size": 64}, ["train_batch_size=64", "train.global_batch_size"]),
    ({"zero_optimization": {"stage": 2}}, ["zero_optimization.stage=2", "deepspeed.zero_stage"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "train.dtype"]),
    ({"optimizer": {"type": "Adam"}}, ["'optimizer'", "train.lr"]),
    ({"fp16": {"enabled": True}}, ["'fp16'", "train.dtype=bf16"]),
])
def test_user_json_that_contradicts_our_config_is_refused_by_validate(tmp_path, user, fragments):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, f"deepspeed.config_path={path}")
    assert all(f in str(err.value) for f in ["deepspeed.config_path", *fragments]), str(err.value)


@pytest.mark.parametrize("override, fragment", [
    ("deepspeed.zero_stage=3", "choose 0, 1 or 2"),
    ("deepspeed.config_path=/nonexistent/ds.json", "does not exist"),
])
def test_bad_deepspeed_keys_are_refused_by_validate(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        _cfg(tmp_path, override)


def test_invalid_json_is_refused_by_validate(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        _cfg(tmp_path, f"deepspeed.config_path={bad}")
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        _cfg(tmp_path, f"deepspeed.config_path={bad}")


def test_native_checkpoint_is_refused_with_a_clear_message(tmp_path):
    from gatepro_dist.backends.deepspeed_engine import load_deepspeed_checkpoint

    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "manifest.json").write_text(json.dumps({"format": 1, "step": 1, "config": {}}))
    with pytest.raises(CheckpointError, match="native backend"):
        load_deepspeed_checkpoint(None, None, ckpt, None, {})


# ---- engines on real process groups -------------------------------------------------------

def _trajectories(rank, world, root):
    """Native 5 steps; then per ZeRO stage: 5 DeepSpeed steps (checkpoint at 3), and a resume from 3."""
    from gatepro_dist.train.parallel import build_parallel_groups
    from gatepro_dist.train.engine import train

    def run(name, *overrides):
        cfg = tiny_config(f"{root}/{name}", *STEPS, *overrides, world_size=world)
        return train(cfg, build_parallel_groups(cfg.parallel.ep), log=lambda *_: None).losses

    out = {"native": run("native")}
    for stage in STAGES:
        ds = ["train.backend=deepspeed", f"deepspeed.zero_stage={stage}"]
        out[f"full{stage}"] = run(f"ds{stage}", *ds)
        out[f"resumed{stage}"] = run(f"resumed{stage}", *ds, f"train.resume={root}/ds{stage}/checkpoints/step_00000003")
    out["native_bf16"] = run("native_bf16", "train.dtype=bf16")
    out["bf16"] = run("bf16", "train.dtype=bf16", "train.backend=deepspeed", "deepspeed.zero_stage=2")
    out["bf16_stage0"] = run("bf16_stage0", "train.dtype=bf16", "train.backend=deepspeed", "deepspeed.zero_stage=0")
    out["bf16_dtypes"] = _bf16_engine_dtypes(world)
    return out


def _bf16_engine_dtypes(world):
    """Every parameter and buffer dtype of the model a bf16 DeepSpeed engine trains, and whether an
    aux-loss-free bias step of 1e-3 survives at |bias| = 0.5 (it rounds away in bf16)."""
    import deepspeed
    import torch

    from gatepro_dist.backends.deepspeed_engine import build_engine
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.parallel import build_parallel_groups

    cfg = tiny_config("/tmp/unused", "train.dtype=bf16", "train.backend=deepspeed", "deepspeed.zero_stage=2",
                      "router.bias.enabled=true", world_size=world)
    groups = build_parallel_groups(cfg.parallel.ep)
    model = Transformer(cfg, groups.ep_group, groups.edp_group)
    engine = build_engine(deepspeed, cfg, groups, model)
    router = model.moe_layers[0].router
    router.expert_bias.fill_(0.5)
    load = torch.zeros_like(router.expert_bias)
    load[0] = 10.0  # expert 0 over-loaded: its bias steps down, the others' up
    router.update_bias(load)
    dtypes = {str(t.dtype) for t in [*engine.module.parameters(), *engine.module.buffers()] if t.is_floating_point()}
    bias = router.expert_bias.tolist()
    engine.destroy()
    return {"dtypes": sorted(dtypes), "router": str(router.weight.dtype), "bias": bias}


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    return root, run_on_ranks(2, _trajectories, str(root))[0]


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_native_loss_trajectory(trajectories, stage):
    """world 2, ep 2, fp32, clipping active (grad norms 1.5-2.5 > train.grad_clip=1).

    The losses come out bit for bit equal; rel=1e-7 leaves room for summation order only. (Letting
    DeepSpeed clip at stage 0, with its mean-of-local-norms, moves them by up to 8e-7 here.)
    """
    _, losses = trajectories
    assert losses[f"full{stage}"] == pytest.approx(losses["native"], rel=1e-7, abs=0)
    assert losses["native"][-1] < losses["native"][0]


def test_bf16_runs_as_native_bf16_with_fp32_parameters_router_and_bias(trajectories):
    """DeepSpeed bf16 runs as the native trainer does: ``torch_autocast`` over fp32 parameters and
    buffers (not the ``bf16`` section, which cast the whole module: router rows and the aux-loss-free
    bias too, where a 1e-3 step at |bias| = 0.5 rounds away). Both are really bf16 -- they differ
    from the fp32 losses by more than fp32 noise (the fp32 engines above agree to 1e-7) and by less
    than bf16's unit roundoff 2^-9 -- and they follow the same trajectory as each other (with the
    bf16 module they were 6.1e-4 apart): at ZeRO 0 for all 5 steps, at ZeRO 2 for the first 3.
    ZeRO 2's reduce-scatter sums in another order (fp32 noise, 2e-7 in the fp32 runs), and once
    that noise flips one bf16 rounding the trajectories part: on the corpus of Debian's Python
    3.11.2 (the data are the interpreter's own sources) by 1.1e-4 at step 5, none on 3.11.7's."""
    _, losses = trajectories

    def max_relative(a, b):
        return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))

    for name in ("native_bf16", "bf16", "bf16_stage0"):
        assert 1e-5 < max_relative(losses[name], losses["native"]) < 2 ** -9, (name, losses[name], losses["native"])
    for name, steps in (("bf16", 3), ("bf16_stage0", 5)):
        ours, native = losses[name][:steps], losses["native_bf16"][:steps]
        assert max_relative(ours, native) < 1e-6, (name, losses[name], losses["native_bf16"])
    assert losses["bf16"][-1] < losses["bf16"][0]
    engine = losses["bf16_dtypes"]
    assert engine["dtypes"] == ["torch.float32"] and engine["router"] == "torch.float32"
    assert engine["bias"][0] == pytest.approx(0.5 - 1e-3) and engine["bias"][1] == pytest.approx(0.5 + 1e-3)


@pytest.mark.parametrize("stage", STAGES)
def test_deepspeed_checkpoint_resumes_bit_for_bit(trajectories, stage):
    root, losses = trajectories
    assert losses[f"resumed{stage}"] == losses[f"full{stage}"][3:]
    saved = root / f"ds{stage}" / "checkpoints"
    assert (saved / "latest").read_text() == "step_00000005"
    manifest = json.loads((saved / "step_00000003" / "manifest.json").read_text())
    assert (manifest["backend"], manifest["step"], manifest["world_size"], manifest["ep"]) == ("deepspeed", 3, 2, 2)
    files = {p.name for p in (saved / "step_00000003").iterdir()}
    assert {"gatepro_expert_parallel_ep000.pt", "gatepro_expert_parallel_ep001.pt", "mp_rank_00_model_states.pt"} <= files
    # Optimizer state: per EP rank at stage 0, per rank's ZeRO partition at 1/2 (DeepSpeed < 0.19.8
    # also writes empty per-EP-rank files there).
    kind = "expp_rank" if stage == 0 else "zero_pp_rank"
    assert {f"{kind}_0_mp_rank_00_optim_states.pt", f"{kind}_1_mp_rank_00_optim_states.pt"} <= files


def _gradients(rank, world, run_dir, stages):
    """One micro-batch: native reduce_gradients vs each DeepSpeed stage's reduced gradient, per parameter."""
    import torch
    import torch.nn.functional as F
    from deepspeed.utils import safe_get_full_grad

    from gatepro_dist.backends.deepspeed_engine import build_engine, import_deepspeed
    from gatepro_dist.train.data import GlobalBatchSampler
    from gatepro_dist.train.model import Transformer
    from gatepro_dist.train.optim import reduce_gradients
    from gatepro_dist.train.parallel import build_parallel_groups
    from gatepro_dist.moe.router import is_expert_parallel
    from gatepro_dist.train.step import load_data, my_part

    cfg = tiny_config(run_dir, "parallel.ep=2", "train.backend=deepspeed", world_size=world)
    groups = build_parallel_groups(2)
    data = load_data(cfg)
    part = my_part(GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, 1, 0, 0).global_batch(0),
                   1, groups)[0]
    inputs, targets = data.train.batch(part)

    def loss_of(model):
        logits, stats = model(inputs)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + sum(s.loss for s in stats)

    native = Transformer(cfg, groups.ep_group, groups.edp_group)
    loss_of(native).backward()
    reduce_gradients(native, groups)
    expected = {n: p.grad.clone() for n, p in native.named_parameters()}

    worst = {}
    for stage in stages:
        cfg.deepspeed.zero_stage = stage
        model = Transformer(cfg, groups.ep_group, groups.edp_group)
        engine = build_engine(import_deepspeed(torch.device("cpu")), cfg, groups, model)
        engine.backward(loss_of(engine))
        diffs = {"expert": 0.0, "dense": 0.0}
        for name, p in model.named_parameters():
            got = p.grad if stage == 0 else safe_get_full_grad(p)
            kind = "expert" if is_expert_parallel(p) else "dense"
            diffs[kind] = max(diffs[kind], float((got - expected[name]).abs().max() / expected[name].abs().max()))
        worst[stage] = diffs
    return worst


def test_deepspeed_reduces_expert_gradients_over_edp_like_native(tmp_path):
    """world 4 = dp 2 x ep 2, so expert gradients really are summed over a 2-rank EDP group.

    Reducing them over the world instead (DeepSpeed's default for a model it does not know is MoE)
    would mix different experts' gradients and be off by O(1).
    """
    for worst in run_on_ranks(4, _gradients, str(tmp_path / "run"), [0, 2]):
        for stage, diffs in worst.items():
            assert diffs["expert"] < 1e-6 and diffs["dense"] < 1e-6, (stage, diffs)

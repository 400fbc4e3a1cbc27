"""Hugging Face import/export: the imported model *is* the HF model, at any ep, and a round trip is exact.

Every model here is a tiny random Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE built locally with
`transformers` (gatepro_dist/hf/tiny.py); nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from distributed import run_on_ranks  # noqa: E402
from gatepro_dist.train.checkpoint import load_checkpoint, read_manifest, save_weights_only  # noqa: E402
from gatepro_dist.config import config_hash, load_config  # noqa: E402
from gatepro_dist.config_checks import validate  # noqa: E402
from gatepro_dist.hf import export_hf, import_hf  # noqa: E402
from gatepro_dist.hf.tiny import VOCAB_SIZE, randomize, save_tiny_model  # noqa: E402
from gatepro_dist.train.model import Transformer  # noqa: E402
from gatepro_dist.train.parallel import build_parallel_groups, single_process_groups  # noqa: E402

FAMILIES = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe"]
TOKENS = torch.randint(0, VOCAB_SIZE, (2, 24), generator=torch.Generator().manual_seed(0))
# fp32, tiny models: both sides do the same arithmetic in a different order.
LOGIT_TOLERANCE = 1e-5


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def our_logits(config_path: str, checkpoint: str, tokens: torch.Tensor, groups) -> torch.Tensor:
    cfg = load_config(config_path, [f"parallel.ep={groups.ep}", "router.gatepro.enabled=false"])
    model = Transformer(cfg, groups.ep_group, groups.edp_group).eval()
    load_checkpoint(checkpoint, model, None, groups)
    with torch.no_grad():
        return model(tokens)[0]


def _ep2_logits(rank, world, jobs, tokens):
    groups = build_parallel_groups(2)
    return {family: our_logits(cfg, ckpt, tokens, groups) for family, (cfg, ckpt) in jobs.items()}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        hf_dir = save_tiny_model(family, root / f"{family}-hf")
        out[family] = (hf_dir, import_hf(hf_dir, root / f"{family}-gp"))
    return out


def test_imported_logits_equal_transformers_at_ep1_and_ep2(imported):
    expected = {f: hf_logits(hf_dir, TOKENS) for f, (hf_dir, _) in imported.items()}
    jobs = {f: (str(run.config_path), str(run.checkpoint)) for f, (_, run) in imported.items()}
    ep1 = {f: our_logits(*jobs[f], TOKENS, single_process_groups()) for f in FAMILIES}
    ep2_ranks = run_on_ranks(2, _ep2_logits, jobs, TOKENS)
    report = []
    for family in FAMILIES:
        scale = float(expected[family].abs().max())
        assert scale > 1.0, "logits this small could hide a wrong conversion"
        diffs = [float((ep1[family] - expected[family]).abs().max())]
        diffs += [float((ranks[family] - expected[family]).abs().max()) for ranks in ep2_ranks]
        report.append(f"{family}: max|logit|={scale:.2f} ep1={diffs[0]:.2e} ep2={max(diffs[1:]):.2e}")
        assert max(diffs) <= LOGIT_TOLERANCE, report[-1]
    print("\n" + "\n".join(report))


def test_import_writes_a_run_that_resumes_weights_only_with_the_models_tokenizer(imported):
    hf_dir, run = imported["qwen2_moe"]
    manifest = read_manifest(run.checkpoint)
    assert manifest["kind"] == "weights-only" and manifest["step"] == 0
    assert manifest["source"]["family"] == "qwen2_moe"
    cfg = validate(load_config(str(run.config_path), []), world_size=1)
    assert cfg.train.resume == "auto" and Path(cfg.train.run_dir) == run.run_dir
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000000"
    assert Path(cfg.data.tokenizer).read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert config_hash(cfg) == manifest["config_hash"]
    # Qwen2-MoE's features all arrive: qkv bias, the gated shared expert, the dense layer 1.
    assert cfg.model.qkv_bias and cfg.moe.num_shared_experts == 1 and cfg.moe.shared_expert_gate
    assert [cfg.model.is_moe_layer(i) for i in range(3)] == [True, False, True]
    assert cfg.train.lr == 2e-5 and cfg.router.gatepro.enabled  # continued-training defaults, GatePro on


def _all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("family, shard, dtype", [
    ("mixtral", "8KB", torch.float32),
    ("olmoe", None, torch.bfloat16),
    ("qwen2_moe", "12KB", torch.float32),
    ("qwen3_moe", None, torch.float16),
])
def test_round_trip_hf_to_gatepro_to_hf_is_bit_identical(tmp_path, family, shard, dtype):
    hf_dir = save_tiny_model(family, tmp_path / "hf", max_shard_size=shard, dtype=dtype)
    assert (hf_dir / "model.safetensors.index.json").is_file() == (shard is not None)
    import_hf(hf_dir, tmp_path / "gp")
    export_hf(tmp_path / "gp", tmp_path / "back", max_shard_size=shard or "5GB")

    original, back = _all_tensors(hf_dir), _all_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file() == (shard is not None)
    config_in = json.loads((hf_dir / "config.json").read_text())
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == config_in
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()


# Models trained here from scratch, in the shape of each family.
NATIVE = {
    "mixtral": [],
    "olmoe": ["model.qk_norm=true", "model.qk_norm_scope=projection", "router.normalize_topk=false"],
    "qwen2_moe": ["model.qkv_bias=true", "moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=16",
                  "moe.shared_expert_gate=true", "model.dense_layers=[1]", "model.n_layers=3",
                  "model.dense_ffn_dim=40", "router.normalize_topk=false"],
    "qwen3_moe": ["model.qk_norm=true", "model.head_dim=16", "model.first_dense_layers=1", "model.moe_every=2",
                  "model.n_layers=4", "model.dense_ffn_dim=40", "model.tie_embeddings=true"],
}
NATIVE_SHAPE = ["model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                "model.n_kv_heads=2", "model.max_seq_len=64", "moe.num_experts=4", "moe.top_k=2",
                "moe.expert_ffn_dim=24", "data.seq_len=32", "router.gatepro.enabled=false"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_trained_here_exports_as_each_family(tmp_path, family):
    cfg = load_config(None, [*NATIVE_SHAPE, *NATIVE[family], f"train.run_dir={tmp_path / 'run'}"])
    model = randomize(Transformer(cfg), seed=1).eval()
    save_weights_only(tmp_path / "run", model.state_dict(), cfg.to_dict(), config_hash(cfg))
    export_hf(tmp_path / "run", tmp_path / "hf", family=family)
    with torch.no_grad():
        ours = model(TOKENS)[0]
    theirs = hf_logits(tmp_path / "hf", TOKENS)
    assert float((ours - theirs).abs().max()) <= LOGIT_TOLERANCE


def test_export_onto_another_models_config_takes_its_extra_keys_but_never_its_weights(tmp_path):
    like = save_tiny_model("mixtral", tmp_path / "like", max_shard_size="8KB")  # sharded: stray shards would show
    cfg = load_config(None, [*NATIVE_SHAPE, f"train.run_dir={tmp_path / 'run'}"])
    model = randomize(Transformer(cfg), seed=2).eval()
    save_weights_only(tmp_path / "run", model.state_dict(), cfg.to_dict(), config_hash(cfg))
    export_hf(tmp_path / "run", tmp_path / "hf", hf_dir=like)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] == 1 and config["rope_parameters"]["rope_theta"] == cfg.model.rope_base
    with torch.no_grad():
        ours = model(TOKENS)[0]
    assert float((ours - hf_logits(tmp_path / "hf", TOKENS)).abs().max()) <= LOGIT_TOLERANCE

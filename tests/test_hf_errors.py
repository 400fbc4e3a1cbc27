"""`gatepro-convert` refuses what it cannot convert exactly: exit 2, one line naming the file, key or
tensor, and nothing written."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from gatepro_dist.cli.convert import main  # noqa: E402
from gatepro_dist.config import config_hash, load_config  # noqa: E402
from gatepro_dist.train.checkpoint import save_weights_only  # noqa: E402
from gatepro_dist.hf.tiny import save_tiny_model  # noqa: E402
from gatepro_dist.train.model import Transformer  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return save_tiny_model("olmoe", tmp_path_factory.mktemp("pristine") / "olmoe")


@pytest.fixture
def hf_dir(pristine, tmp_path):
    copy = tmp_path / "hf"
    copy.mkdir()
    for file in pristine.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def convert(capsys, *args) -> str:
    """Run the CLI in-process; assert exit 2 with exactly one error line; return that line."""
    capsys.readouterr()  # drop what building the fixture printed
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("gatepro-convert: error:"), err
    return err[0]


def edit_config(hf_dir: Path, **changes) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps(config))


def refuse_import(capsys, hf_dir: Path, tmp_path: Path, *needles: str, extra=()) -> None:
    line = convert(capsys, "hf-to-gp", hf_dir, tmp_path / "out", *extra)
    for needle in needles:
        assert needle in line, line
    assert not (tmp_path / "out").exists(), "a refused conversion must write nothing"


def test_unsupported_architecture_is_named(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    refuse_import(capsys, hf_dir, tmp_path, "deepseek_v3", "mixtral, olmoe, qwen2_moe, qwen3_moe")


def test_missing_config_json_is_named(capsys, hf_dir, tmp_path):
    (hf_dir / "config.json").unlink()
    refuse_import(capsys, hf_dir, tmp_path, str(hf_dir / "config.json"))


def test_missing_weights_are_named(capsys, hf_dir, tmp_path):
    (hf_dir / "model.safetensors").unlink()
    refuse_import(capsys, hf_dir, tmp_path, "no *.safetensors", str(hf_dir))


def test_missing_shard_named_in_the_index_is_named(capsys, tmp_path):
    hf_dir = save_tiny_model("mixtral", tmp_path / "hf", max_shard_size="8KB")
    shard = sorted(hf_dir.glob("model-*.safetensors"))[-1]
    shard.unlink()
    refuse_import(capsys, hf_dir, tmp_path, shard.name, "model.safetensors.index.json")


def test_missing_tensor_is_named(capsys, hf_dir, tmp_path):
    tensors = load_file(str(hf_dir / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    refuse_import(capsys, hf_dir, tmp_path, "model.layers.1.mlp.experts.5.up_proj.weight", "missing")


def test_shape_mismatch_names_the_tensor_and_both_shapes(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, intermediate_size=20)
    refuse_import(capsys, hf_dir, tmp_path, "model.layers.0.mlp.experts.0.gate_proj.weight", "[24, 32]", "[20, 32]")


def test_a_tensor_the_config_does_not_explain_is_named(capsys, hf_dir, tmp_path):
    edit_config(hf_dir, num_hidden_layers=1)
    refuse_import(capsys, hf_dir, tmp_path, "model.layers.1.", "num_hidden_layers")


@pytest.mark.parametrize("changes, needle", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"clip_qkv": 8.0}, "clip_qkv"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_features_we_cannot_reproduce_exactly_are_refused(capsys, hf_dir, tmp_path, changes, needle):
    edit_config(hf_dir, **changes)
    refuse_import(capsys, hf_dir, tmp_path, needle)


def test_missing_tokenizer_is_named(capsys, hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").unlink()
    refuse_import(capsys, hf_dir, tmp_path, str(hf_dir / "tokenizer.json"), "--tokenizer")


def test_an_override_that_contradicts_the_checkpoint_is_refused(capsys, hf_dir, tmp_path):
    refuse_import(capsys, hf_dir, tmp_path, "model.d_model", extra=["model.d_model=64"])


def test_a_config_that_sets_a_shape_key_is_refused(capsys, hf_dir, tmp_path):
    (tmp_path / "c.yaml").write_text("moe: {top_k: 3}\n")
    refuse_import(capsys, hf_dir, tmp_path, "moe.top_k", extra=["--config", tmp_path / "c.yaml"])


def test_converting_into_a_run_that_has_checkpoints_is_refused(capsys, hf_dir, tmp_path):
    assert main(["hf-to-gp", str(hf_dir), str(tmp_path / "out")]) == 0
    capsys.readouterr()
    line = convert(capsys, "hf-to-gp", hf_dir, tmp_path / "out")
    assert "already holds checkpoints/" in line


def _native_run(tmp_path: Path, *overrides: str) -> Path:
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
                             "moe.num_experts=4", "moe.expert_ffn_dim=16", *overrides])
    save_weights_only(tmp_path / "run", Transformer(cfg).state_dict(), cfg.to_dict(), config_hash(cfg))
    return tmp_path / "run"


def test_export_without_a_family_or_hf_config_asks_for_one(capsys, tmp_path):
    line = convert(capsys, "gp-to-hf", _native_run(tmp_path), tmp_path / "hf")
    assert "--family" in line and not (tmp_path / "hf").exists()


def test_export_names_the_key_the_family_cannot_express(capsys, tmp_path):
    run = _native_run(tmp_path, "model.qk_norm=true")
    line = convert(capsys, "gp-to-hf", run, tmp_path / "hf", "--family", "mixtral")
    assert "model.qk_norm" in line and not (tmp_path / "hf").exists()


def test_export_refuses_a_nonzero_routing_bias(capsys, tmp_path):
    cfg = load_config(None, ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                             "moe.num_experts=4", "moe.expert_ffn_dim=16", "router.bias.enabled=true"])
    state = Transformer(cfg).state_dict()
    state["layers.0.ffn.router.expert_bias"][0] = 0.5
    save_weights_only(tmp_path / "run", state, cfg.to_dict(), config_hash(cfg))
    line = convert(capsys, "gp-to-hf", tmp_path / "run", tmp_path / "hf", "--family", "mixtral")
    assert "layers.0.ffn.router.expert_bias" in line


def test_export_from_a_path_that_is_no_checkpoint_is_named(capsys, tmp_path):
    line = convert(capsys, "gp-to-hf", tmp_path / "nowhere", tmp_path / "hf")
    assert str(tmp_path / "nowhere") in line


def test_the_console_script_is_installed_and_exits_2(tmp_path):
    script = shutil.which("gatepro-convert")
    assert script is not None, "pip install -e . registers gatepro-convert (pyproject [project.scripts])"
    proc = subprocess.run([script, "hf-to-gp", str(tmp_path / "none"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gatepro-convert: error: {tmp_path / 'none'} is not a directory; pass a local Hugging Face model directory"]

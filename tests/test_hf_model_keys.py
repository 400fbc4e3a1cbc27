"""The schema keys the Hugging Face families need: QK-norm scope, explicit dense layers, and text
encoded with the model's own tokenizer (data.tokenizer, a local tokenizer.json)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gatepro_dist.data import text as data_module
from gatepro_dist.config import ConfigError, load_config
from gatepro_dist.config_checks import validate
from gatepro_dist.data import DataError, load_tokens
from gatepro_dist.moe.experts import SwiGLU
from gatepro_dist.train.model import Attention, Transformer, rope_tables
from gatepro_dist.moe import MoELayer
from gatepro_dist.train.step import load_data

SMALL = ["model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2", "moe.num_experts=4",
         "moe.expert_ffn_dim=16", "model.dense_ffn_dim=24"]


def test_dense_layers_get_a_dense_ffn_and_the_rest_stay_moe():
    cfg = load_config(None, [*SMALL, "model.n_layers=4", "model.dense_layers=[1, 2]"])
    model = Transformer(cfg)
    assert [type(block.ffn) for block in model.layers] == [MoELayer, SwiGLU, SwiGLU, MoELayer]
    # with Qwen's decoder_sparse_step=2 mapping (first_dense_layers=1, moe_every=2) on top
    cfg = load_config(None, ["model.n_layers=6", "model.first_dense_layers=1", "model.moe_every=2",
                             "model.dense_layers=[3]"])
    assert [cfg.model.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]


def test_a_dense_layer_outside_the_model_is_named(tmp_path):
    cfg = load_config(None, ["model.n_layers=4", "model.dense_layers=[0, 4]", f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model.dense_layers\[1\]=4 is not a layer index"):
        validate(cfg, world_size=1)


def _attention(scope: str) -> Attention:
    cfg = load_config(None, [*SMALL, "model.qk_norm=true", f"model.qk_norm_scope={scope}"])
    torch.manual_seed(0)
    attn = Attention(cfg)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 1.0))
    return attn


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_qk_norm_scope_sets_what_one_rms_norm_covers(scope):
    attn = _attention(scope)
    heads, kv_heads, head_dim = 4, 2, 8
    assert attn.q_norm.weight.shape == ((head_dim,) if scope == "head" else (heads * head_dim,))
    assert attn.k_norm.weight.shape == ((head_dim,) if scope == "head" else (kv_heads * head_dim,))

    x = torch.randn(2, 5, 32)
    cos, sin = rope_tables(5, head_dim, 10000.0)

    def rms(t, weight):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * weight

    q, k = attn.q_proj(x), attn.k_proj(x)
    if scope == "projection":  # OLMoE: one norm over all heads, then split
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    q, k = q.view(2, 5, heads, head_dim), k.view(2, 5, kv_heads, head_dim)
    if scope == "head":  # Qwen3: each head's vector on its own
        q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
    from gatepro_dist.train.model import apply_rope

    q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(2, 5, kv_heads, head_dim).transpose(1, 2)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = attn.o_proj(expected.transpose(1, 2).reshape(2, 5, -1))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-6)


# ---- data.tokenizer -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from gatepro_dist.hf.tiny import tiny_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer().save(str(path))
    return path


@pytest.fixture
def corpus(tmp_path):
    from gatepro_dist.hf.tiny import tiny_text

    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text(200))
    return path


def test_text_is_encoded_with_the_given_tokenizer(tokenizer_file, corpus, monkeypatch):
    from tokenizers import Tokenizer

    expected = Tokenizer.from_file(str(tokenizer_file)).encode(corpus.read_text(), add_special_tokens=False).ids
    stream = load_tokens(corpus, tokenizer=tokenizer_file)
    assert not stream.byte_level and str(tokenizer_file) in stream.description
    assert stream.slice(0, len(stream)).tolist() == expected
    monkeypatch.setattr(data_module, "ENCODE_PIECE_CHARS", 64)  # many pieces, cut after newlines
    assert load_tokens(corpus, tokenizer=tokenizer_file).slice(0, len(stream)).tolist() == expected


def test_the_trainer_reads_data_tokenizer_and_checks_the_vocabulary(tokenizer_file, corpus, tmp_path):
    common = ["data.seq_len=16", f"data.source={corpus}", f"data.tokenizer={tokenizer_file}",
              f"train.run_dir={tmp_path / 'run'}", "model.max_seq_len=64"]
    data = load_data(validate(load_config(None, [*common, "model.vocab_size=96"]), world_size=1))
    assert int(data.train.stream.max_token()) < 96 and len(data.train) > 10
    with pytest.raises(DataError, match="raise model.vocab_size"):
        load_data(load_config(None, [*common, "model.vocab_size=40"]))


def test_a_missing_or_unreadable_tokenizer_is_named(tmp_path, corpus):
    cfg = load_config(None, [f"data.tokenizer={tmp_path / 'nope.json'}", f"train.run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="data.tokenizer"):
        validate(cfg, world_size=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match=str(broken)):
        load_tokens(corpus, tokenizer=broken)


def test_tokenize_command_writes_the_tokens_training_would_read(tokenizer_file, corpus, tmp_path, capsys):
    from gatepro_dist.cli.convert import main

    out = tmp_path / "corpus"
    assert main(["tokenize", "--quiet", "--tokenizer", str(tokenizer_file), "--out", str(out), str(corpus)]) == 0
    assert f"data.source={out}" in capsys.readouterr().out
    from_shards = load_tokens(out)  # one document, ended by the tokenizer's </s>
    from_text = load_tokens(corpus, tokenizer=tokenizer_file)
    assert from_shards.eos_id == 2 and from_shards.parts[0].dtype == np.uint16
    assert np.array_equal(from_shards.slice(0, len(from_shards)), np.append(from_text.slice(0, len(from_text)), 2))

"""The Hugging Face MoE families we convert, and how their config.json maps onto our Config.

Four families share one transformer shape (pre-norm, RoPE rotate-half, GQA, SwiGLU experts) and
differ in a handful of switches, which is all a `Family` records:

    family      MoE block            expert tensors             QK-norm      extras
    mixtral     block_sparse_moe     w1 / w3 / w2               -            top-k weights renormalised
    olmoe       mlp                  gate/up/down_proj          projection   norm_topk_prob
    qwen2_moe   mlp                  gate/up/down_proj          -            qkv bias, gated shared expert,
                                                                             dense layers (mlp_only_layers)
    qwen3_moe   mlp                  gate/up/down_proj          per head     dense layers (mlp_only_layers)

config.json is read as plain JSON (no `transformers` needed), accepting both the v4 spelling
(`rope_theta`, `num_experts`) and the v5 one (`rope_parameters`, `num_local_experts`). Anything we
cannot reproduce exactly (another activation, scaled RoPE, an output-projection bias, QKV
clipping) is refused with a one-line `HFConversionError` naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class HFConversionError(ValueError):
    """A checkpoint or config we cannot convert; the message is one line naming the key or tensor."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str
    moe_block: str  # the MoE submodule of a decoder layer ("mlp", or "block_sparse_moe" for Mixtral)
    expert_weights: tuple[str, str, str]  # per-expert (gate, up, down) tensor names
    qk_norm_scope: str | None  # None: no QK-norm
    shared_expert: bool  # Qwen2-MoE's sigmoid-gated shared expert
    sparse_layout: bool  # decoder_sparse_step / mlp_only_layers place dense layers
    renormalises_topk: bool  # Mixtral always renormalises; the others read norm_topk_prob
    experts_key: str  # the key for the expert count when we write a config.json from scratch

    @property
    def router(self) -> str:
        return f"{self.moe_block}.gate"


_PROJ = ("gate_proj", "up_proj", "down_proj")
FAMILIES: dict[str, Family] = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"), None,
                      shared_expert=False, sparse_layout=False, renormalises_topk=True,
                      experts_key="num_local_experts"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", _PROJ, "projection",
                    shared_expert=False, sparse_layout=False, renormalises_topk=False, experts_key="num_experts"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp", _PROJ, None,
                        shared_expert=True, sparse_layout=True, renormalises_topk=False, experts_key="num_experts"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp", _PROJ, "head",
                        shared_expert=False, sparse_layout=True, renormalises_topk=False, experts_key="num_experts"),
}


def family_named(name: str) -> Family:
    if name not in FAMILIES:
        raise HFConversionError(f"unsupported architecture '{name}' (model_type); supported: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of(hf: dict, where: str) -> Family:
    model_type = hf.get("model_type")
    if model_type is None:
        raise HFConversionError(f"{where} has no 'model_type'; it is not a Hugging Face model config")
    if model_type not in FAMILIES:
        arch = ", ".join(hf.get("architectures") or []) or "?"
        raise HFConversionError(
            f"unsupported architecture '{model_type}' ({arch}) in {where}; supported model_type values: "
            f"{', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


# ---- config.json -> our keys ----------------------------------------------------------------

def _require(hf: dict, key: str, where: str) -> Any:
    if hf.get(key) is None:
        raise HFConversionError(f"{where} lacks '{key}', which a {hf.get('model_type')} config needs")
    return hf[key]


def _first(hf: dict, keys: tuple[str, ...], where: str) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    raise HFConversionError(f"{where} lacks '{keys[0]}', which a {hf.get('model_type')} config needs")


def rope_theta(hf: dict, where: str) -> float:
    """RoPE base from `rope_parameters` (transformers v5) or `rope_theta` (v4); plain RoPE only."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise HFConversionError(f"{where} has rope_type '{rope_type}'; only plain RoPE (rope_type 'default') is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def sliding_window(hf: dict, family: Family) -> int | None:
    """The attention window, or None for full causal attention."""
    if family.sparse_layout and not hf.get("use_sliding_window", False):
        return None  # Qwen: `sliding_window` is only read when use_sliding_window is true
    window = hf.get("sliding_window")
    return int(window) if window else None


def moe_layer_placement(hf: dict, family: Family, n_layers: int, where: str) -> dict:
    """Qwen's (decoder_sparse_step, mlp_only_layers) as (first_dense_layers, moe_every, dense_layers).

    HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % step == 0. Ours: i not in
    dense_layers and i >= first and (i - first) % every == 0. With first = step - 1 and
    every = step the two agree for every i >= 0.
    """
    if not family.sparse_layout:
        return {"first_dense_layers": 0, "moe_every": 1, "dense_layers": []}
    step = int(hf.get("decoder_sparse_step") or 1)
    if step < 1:
        raise HFConversionError(f"{where} has decoder_sparse_step={step}; it must be >= 1")
    only_dense = sorted(int(i) for i in (hf.get("mlp_only_layers") or []))
    bad = [i for i in only_dense if not 0 <= i < n_layers]
    if bad:
        raise HFConversionError(f"{where} has mlp_only_layers entry {bad[0]} outside 0..{n_layers - 1}")
    return {"first_dense_layers": step - 1, "moe_every": step, "dense_layers": only_dense}


def gatepro_keys_from_hf(hf: dict, where: str) -> tuple[Family, dict[str, Any], dict[str, Any]]:
    """(family, forced, hints): our dotted keys fixed by the checkpoint, and training hints.

    `forced` keys define the function the weights compute: changing any of them would make the
    imported model differ from the original. `hints` (the aux-loss coefficient the model was
    trained with) are defaults a user config may override.
    """
    family = family_of(hf, where)
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFConversionError(f"{where} has hidden_act '{act}'; only SwiGLU experts (silu) are supported")
    if hf.get("attention_bias"):
        raise HFConversionError(
            f"{where} has attention_bias=true, which adds an output-projection bias we do not model; "
            "only q/k/v biases (Qwen2-MoE's qkv_bias) are supported"
        )
    if hf.get("clip_qkv") is not None:
        raise HFConversionError(f"{where} has clip_qkv={hf['clip_qkv']}; QKV clipping is not supported (use null)")
    d_model = int(_require(hf, "hidden_size", where))
    n_heads = int(_require(hf, "num_attention_heads", where))
    n_layers = int(_require(hf, "num_hidden_layers", where))
    n_kv = int(hf.get("num_key_value_heads") or n_heads)
    head_dim = hf.get("head_dim")
    head_dim = int(head_dim) if head_dim else None
    if family.qk_norm_scope == "projection" and head_dim not in (None, d_model // n_heads):
        raise HFConversionError(f"{where} has head_dim={head_dim}, but OLMoE's QK-norm assumes hidden_size / heads")
    num_experts = int(_first(hf, ("num_experts", "num_local_experts"), where))
    if num_experts < 1:
        raise HFConversionError(f"{where} has num_experts={num_experts}; a model without experts is not an MoE")
    expert_ffn = int(_first(hf, ("moe_intermediate_size", "intermediate_size") if family.sparse_layout
                            else ("intermediate_size",), where))
    max_seq = int(hf.get("max_position_embeddings") or 4096)
    window = sliding_window(hf, family)
    if window is not None:
        max_seq = min(max_seq, window)  # sequences no longer than the window see full causal attention

    forced: dict[str, Any] = {
        "model.vocab_size": int(_require(hf, "vocab_size", where)),
        "model.d_model": d_model,
        "model.n_layers": n_layers,
        "model.n_heads": n_heads,
        "model.n_kv_heads": n_kv,
        "model.head_dim": head_dim,
        "model.rope_base": rope_theta(hf, where),
        "model.qk_norm": family.qk_norm_scope is not None,
        "model.qk_norm_scope": family.qk_norm_scope or "head",
        "model.qkv_bias": bool(hf.get("qkv_bias", True)) if family.model_type == "qwen2_moe" else False,
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "model.max_seq_len": max_seq,
        "model.dense_ffn_dim": int(hf.get("intermediate_size") or expert_ffn) if family.sparse_layout else expert_ffn,
        "moe.num_experts": num_experts,
        "moe.top_k": int(_require(hf, "num_experts_per_tok", where)),
        "moe.expert_ffn_dim": expert_ffn,
        "moe.num_shared_experts": 0,
        "moe.shared_expert_ffn_dim": None,
        "moe.shared_expert_gate": False,
        "moe.capacity_factor": None,  # Hugging Face MoE blocks are dropless
        "router.normalize_topk": True if family.renormalises_topk else bool(hf.get("norm_topk_prob", False)),
    }
    forced.update({f"model.{k}": v for k, v in moe_layer_placement(hf, family, n_layers, where).items()})
    if family.shared_expert:
        shared = int(hf.get("shared_expert_intermediate_size") or 0)
        if shared > 0:
            forced.update({"moe.num_shared_experts": 1, "moe.shared_expert_ffn_dim": shared,
                           "moe.shared_expert_gate": True})
    hints = {}
    if hf.get("router_aux_loss_coef") is not None:
        hints["router.aux_loss_coef"] = float(hf["router_aux_loss_coef"])
    if hf.get("router_z_loss_coef") is not None:
        hints["router.z_loss_coef"] = float(hf["router_z_loss_coef"])
    return family, forced, hints


# ---- our Config -> config.json --------------------------------------------------------------

def check_exportable(cfg, family: Family) -> None:
    """Refuse a model the family cannot express; the message names our key."""
    m, moe = cfg.model, cfg.moe

    def refuse(key: str, value: Any, why: str) -> HFConversionError:
        return HFConversionError(f"{key}={value!r} cannot be exported as {family.model_type}: {why}")

    dense = [i for i in range(m.n_layers) if not m.is_moe_layer(i)]
    if dense and not family.sparse_layout:
        raise refuse("model.dense_layers", dense, "every layer of this family is an MoE layer")
    if family.qk_norm_scope is None and m.qk_norm:
        raise refuse("model.qk_norm", True, "this family has no QK-norm")
    if family.qk_norm_scope is not None and (not m.qk_norm or m.qk_norm_scope != family.qk_norm_scope):
        raise refuse("model.qk_norm_scope", m.qk_norm_scope if m.qk_norm else None,
                     f"this family normalises queries and keys per {family.qk_norm_scope}")
    if family.qk_norm_scope == "projection" and m.effective_head_dim * m.n_heads != m.d_model:
        raise refuse("model.head_dim", m.head_dim, "OLMoE needs n_heads * head_dim == d_model")
    if m.qkv_bias and family.model_type != "qwen2_moe":
        raise refuse("model.qkv_bias", True, "only Qwen2-MoE has q/k/v biases")
    if moe.num_shared_experts and not family.shared_expert:
        raise refuse("moe.num_shared_experts", moe.num_shared_experts, "this family has no shared expert")
    if family.shared_expert and moe.num_shared_experts and not moe.shared_expert_gate:
        raise refuse("moe.shared_expert_gate", False, "Qwen2-MoE's shared expert is always gated")
    if family.shared_expert and not moe.num_shared_experts:
        raise refuse("moe.num_shared_experts", 0, "Qwen2-MoE always has a shared expert")
    if family.renormalises_topk and not cfg.router.normalize_topk:
        raise refuse("router.normalize_topk", False, "Mixtral always renormalises the top-k weights")
    if moe.capacity_factor is not None:
        raise refuse("moe.capacity_factor", moe.capacity_factor, "Hugging Face MoE blocks are dropless")


def hf_config_from_gatepro(cfg, family: Family, base: dict | None, dtype: str) -> dict:
    """A config.json for `cfg`: `base` (the imported model's own config.json) updated with every
    value our config fixes, or a fresh config when there is no base."""
    m, moe = cfg.model, cfg.moe
    out = dict(base or {})
    out.update({
        "architectures": [family.architecture], "model_type": family.model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "hidden_act": out.get("hidden_act", "silu"), "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "num_experts_per_tok": moe.top_k, "dtype": dtype,
    })
    if "torch_dtype" in out:
        out["torch_dtype"] = dtype
    if m.head_dim is not None or out.get("head_dim") is not None:
        out["head_dim"] = m.effective_head_dim
    if not base or not out.get("max_position_embeddings"):
        out["max_position_embeddings"] = m.max_seq_len
    if isinstance(out.get("rope_parameters"), dict):
        out["rope_parameters"] = {**out["rope_parameters"], "rope_theta": m.rope_base}
    else:
        out["rope_theta"] = m.rope_base
    expert_keys = [k for k in ("num_experts", "num_local_experts") if k in out] or [family.experts_key]
    out.update({k: moe.num_experts for k in expert_keys})
    if not family.renormalises_topk:
        out["norm_topk_prob"] = cfg.router.normalize_topk
    if family.model_type in ("mixtral", "olmoe"):
        out["intermediate_size"] = moe.expert_ffn_dim
    else:
        out["moe_intermediate_size"] = moe.expert_ffn_dim
        out["intermediate_size"] = m.dense_ffn_dim
        _set_dense_layers(out, m, family)
    if family.model_type == "qwen2_moe":
        out["qkv_bias"] = m.qkv_bias
        out["shared_expert_intermediate_size"] = moe.effective_shared_expert_ffn_dim * moe.num_shared_experts
    if family.model_type in ("olmoe", "qwen3_moe"):
        out["attention_bias"] = False
    if not base:
        out.update({"initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True,
                    "bos_token_id": None, "eos_token_id": None, "pad_token_id": None})
        if family.sparse_layout:
            out["use_sliding_window"] = False
    return out


def _set_dense_layers(out: dict, m, family: Family) -> None:
    """Keep the base's (decoder_sparse_step, mlp_only_layers) when they place the same MoE layers;
    otherwise list every dense layer explicitly with step 1."""
    want = [m.is_moe_layer(i) for i in range(m.n_layers)]
    step, only = int(out.get("decoder_sparse_step") or 1), set(out.get("mlp_only_layers") or [])
    if [i not in only and (i + 1) % step == 0 for i in range(m.n_layers)] != want:
        out["decoder_sparse_step"] = 1
        out["mlp_only_layers"] = [i for i, moe in enumerate(want) if not moe]
    else:
        out.setdefault("decoder_sparse_step", step)
        out.setdefault("mlp_only_layers", sorted(only))

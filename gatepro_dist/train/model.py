"""A decoder-only transformer whose FFNs are MoE layers (every layer, or every n-th).

Pre-norm blocks: RMSNorm -> grouped-query attention with RoPE (optional QK-norm) -> residual,
RMSNorm -> FFN (MoELayer or dense SwiGLU) -> residual. Parameter names follow the usual
Mixtral/OLMoE/Qwen-MoE layout so checkpoints can be mapped onto them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..cluster import faults
from ..config import Config
from ..data.batch import document_layout
from ..moe.experts import SwiGLU
from ..moe.layer import MoELayer, MoESpec, MoEStats


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles_SH = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    angles_SD = torch.cat([angles_SH, angles_SH], dim=-1)
    return angles_SD.cos().float(), angles_SD.sin().float()


def apply_rope(x_BHSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    half = x_BHSD.shape[-1] // 2
    rotated = torch.cat([-x_BHSD[..., half:], x_BHSD[..., :half]], dim=-1)
    return (x_BHSD * cos_SD + rotated * sin_SD).to(x_BHSD.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        m = cfg.model
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, m.n_kv_heads, m.effective_head_dim
        self.q_proj = nn.Linear(m.d_model, m.n_heads * self.head_dim, bias=m.qkv_bias)
        self.k_proj = nn.Linear(m.d_model, m.n_kv_heads * self.head_dim, bias=m.qkv_bias)
        self.v_proj = nn.Linear(m.d_model, m.n_kv_heads * self.head_dim, bias=m.qkv_bias)
        self.o_proj = nn.Linear(m.n_heads * self.head_dim, m.d_model, bias=False)
        # QK-norm per head (Qwen3-MoE) or over the whole projection, all heads at once (OLMoE).
        self.qk_norm_per_head = m.qk_norm_scope == "head"
        q_width, k_width = ((self.head_dim, self.head_dim) if self.qk_norm_per_head
                            else (m.n_heads * self.head_dim, m.n_kv_heads * self.head_dim))
        self.q_norm = RMSNorm(q_width, m.norm_eps) if m.qk_norm else None
        self.k_norm = RMSNorm(k_width, m.norm_eps) if m.qk_norm else None

    def forward(self, x_BSD: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor,
                mask_B1SS: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention; with ``mask_B1SS`` (document masking: True where a query may see a key)
        block-causal through SDPA's boolean mask, with per-row rotary tables (cos/sin [B, 1, S, D])."""
        batch, seq, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.q_norm is not None and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHSD = apply_rope(q.transpose(1, 2), cos_SD, sin_SD)
        k_BHSD = apply_rope(k.transpose(1, 2), cos_SD, sin_SD)
        v_BHSD = v.transpose(1, 2)
        if mask_B1SS is None:
            out = F.scaled_dot_product_attention(
                q_BHSD, k_BHSD, v_BHSD, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
            )
        else:
            out = F.scaled_dot_product_attention(
                q_BHSD, k_BHSD, v_BHSD, attn_mask=mask_B1SS, enable_gqa=self.n_kv_heads != self.n_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def moe_spec(cfg: Config) -> MoESpec:
    m, r = cfg.moe, cfg.router
    return MoESpec(
        hidden_size=cfg.model.d_model, num_experts=m.num_experts, top_k=m.top_k,
        expert_ffn_dim=m.expert_ffn_dim, num_shared_experts=m.num_shared_experts,
        shared_expert_ffn_dim=m.shared_expert_ffn_dim, shared_expert_gate=m.shared_expert_gate,
        capacity_factor=m.capacity_factor, drop_policy=m.drop_policy, grouped_gemm=m.grouped_gemm,
        gatepro=r.gatepro.enabled_at(0), penalty=r.gatepro.penalty, gatepro_mode=r.gatepro.mode,
        gatepro_pairing=r.gatepro.pairing, gatepro_space=r.gatepro.space, logit_precision=r.logit_precision,
        normalize_topk=r.normalize_topk,
        aux_loss_coef=r.aux_loss_coef, z_loss_coef=r.z_loss_coef, bias_enabled=r.bias.enabled,
        bias_update_rate=r.bias.update_rate, check_pairs=r.check_pairs, router_init_std=r.init_std,
    )


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_index: int, ep_group=None, balance_group=None):
        super().__init__()
        m = cfg.model
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
        if m.is_moe_layer(layer_index):
            self.ffn = MoELayer(moe_spec(cfg), ep_group, balance_group)
        else:
            self.ffn = SwiGLU(m.d_model, m.dense_ffn_dim)
        self.checkpointing = cfg.train.activation_checkpointing

    def forward(self, x, cos, sin, mask=None) -> tuple[torch.Tensor, MoEStats | None]:
        """With activation checkpointing (``train.activation_checkpointing``) the block, or its MoE
        FFN, keeps only its inputs and runs again in backward, all-to-all included: every rank
        recomputes the same layers in the same order, so the collectives pair up as in forward."""
        if self.checkpointing == "block" and torch.is_grad_enabled():
            return checkpoint(self._forward, x, cos, sin, mask, use_reentrant=False)
        return self._forward(x, cos, sin, mask)

    def _forward(self, x, cos, sin, mask=None) -> tuple[torch.Tensor, MoEStats | None]:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        h = self.ffn_norm(x)
        if isinstance(self.ffn, MoELayer):
            if self.checkpointing == "moe" and torch.is_grad_enabled():
                ffn_out, stats = checkpoint(self.ffn, h, use_reentrant=False)
            else:
                ffn_out, stats = self.ffn(h)
            return x + ffn_out, stats
        return x + self.ffn(h), None


class Transformer(nn.Module):
    """``forward(tokens) -> (logits, [MoEStats per MoE layer])``."""

    def __init__(self, cfg: Config, ep_group=None, balance_group=None):
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, ep_group, balance_group) for i in range(m.n_layers))
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = None if m.tie_embeddings else nn.Linear(m.d_model, m.vocab_size, bias=False)
        cos, sin = rope_tables(m.max_seq_len, m.effective_head_dim, m.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # data.document_mask: attention inside each document, positions restarting after each end-of-document id.
        self.document_eos = cfg.data.eos_id if cfg.data.document_mask else None
        self.init_weights(cfg.train.seed)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoELayer)]

    def init_weights(self, seed: int) -> None:
        """Deterministic init that does not depend on the parallel layout.

        Replicated parameters come from one generator in a fixed order; experts and router rows
        from per-expert generators, so expert e is the same tensor at any ep. A model on the
        ``meta`` device (``gatepro-plan``) has shapes and no values: nothing is drawn.
        """
        if self.embed.weight.is_meta:
            return
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if getattr(p, "expert_parallel", False):
                    continue
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            for index, layer in enumerate(self.moe_layers):
                layer.reset_expert_parameters(seed * 1000 + index)

    def set_gatepro(self, enabled: bool) -> None:
        for layer in self.moe_layers:
            layer.router.gatepro_enabled = enabled

    def forward(self, tokens_BS: torch.Tensor) -> tuple[torch.Tensor, list[MoEStats]]:
        seq = tokens_BS.shape[1]
        if seq > self.rope_cos.shape[0]:
            raise ValueError(
                f"sequence length {seq} exceeds model.max_seq_len={self.rope_cos.shape[0]}; "
                "raise model.max_seq_len or shorten data.seq_len"
            )
        cos, sin, mask = self.rope_cos[:seq], self.rope_sin[:seq], None
        if self.document_eos is not None:
            positions_BS, mask = document_layout(tokens_BS, self.document_eos)
            cos, sin = self.rope_cos[positions_BS].unsqueeze(1), self.rope_sin[positions_BS].unsqueeze(1)
        x = self.embed(tokens_BS)
        all_stats, finite = [], []
        for index, block in enumerate(self.layers):
            faults.point("forward")
            x, stats = block(x, cos, sin, mask)
            x = faults.corrupt_activation(x, index)
            finite.append(torch.isfinite(x.detach()).all())  # no sync: read only after a bad step
            if stats is not None:
                all_stats.append(stats)
        self.finite_outputs_L = torch.stack(finite)
        x = self.norm(x)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, weight), all_stats

"""What one rank of a training job needs, before any machine is asked for (``gatepro-plan``).

Parameter, gradient and AdamW bytes are not a formula: the model is built on the ``meta`` device
(shapes, no values) under a fake process group of the target world size, and sharded exactly as
the trainer shards it (``parallel.dp_shard``), so each rank's shards -- FSDP's padding and its
choice of dimension included -- are the real ones. Activations are counted tensor by tensor from
what the model saves for backward (``activation_bytes``, checked against autograd's own count in
tests/test_plan.py); communication is the MoE layer's comm model plus FSDP's gathers and
reduce-scatters, or the replicated engine's all-reduces.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import Config
from ..moe import comm
from ..moe.comm_model import ACTIVATION_BYTES, LayerComm
from ..moe.router import is_expert_parallel
from .model import Transformer
from .parallel import ParallelGroups, build_parallel_groups, single_process_groups
from .sharding import shard_model

FP32, INT64 = 4, 8
GiB = 2**30


@dataclass(frozen=True)
class StateBytes:
    """What one rank holds between steps, and what it gathers for a step."""

    dense: int  # fp32 dense weights this rank holds (FSDP: its shards)
    expert: int  # fp32 expert weights and router rows this rank holds
    tensors: int  # parameter tensors (AdamW keeps a step counter for each)
    gathered_block: int  # FSDP: the largest block's weights as gathered for compute; 0 replicated
    total_params: int  # of the whole model
    expert_params: int  # of the whole model

    @property
    def params(self) -> int:
        return self.dense + self.expert

    @property
    def grads(self) -> int:  # fp32, the shapes of the weights
        return self.params

    @property
    def optimizer(self) -> int:  # AdamW: two fp32 moments per weight, one fp32 step counter per tensor
        return 2 * self.params + FP32 * self.tensors


@contextmanager
def fake_world(world: int, rank: int):
    """A process group of ``world`` ranks with no communication (every collective returns at once)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("gatepro-plan builds its own fake process group; run it outside a distributed job")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def state_bytes(cfg: Config, world: int, rank: int = 0) -> StateBytes:
    """Rank ``rank``'s parameters, gradients and AdamW state at ``world`` ranks. Rank 0 is the
    largest: FSDP gives it the first (never smaller) chunk of every tensor."""
    if world == 1:
        return _count(cfg, single_process_groups())
    with fake_world(world, rank):
        return _count(cfg, build_parallel_groups(cfg.parallel.ep, "cpu", cfg.parallel.dp_shard))


def _count(cfg: Config, groups: ParallelGroups) -> StateBytes:
    with torch.device("meta"):
        model = Transformer(cfg, groups.ep_group, groups.edp_group)
    expert_total = sum(p.numel() * groups.ep for p in model.parameters() if is_expert_parallel(p))
    dense_total = sum(p.numel() for p in model.parameters() if not is_expert_parallel(p))
    gathered_block = 0
    if groups.dp_shard:
        # Before sharding: what one block's weights are once gathered (experts: this EP rank's).
        compute_bytes = ACTIVATION_BYTES[cfg.train.dtype]
        gathered_block = max(sum(p.numel() for p in block.parameters()) for block in model.layers) * compute_bytes
        shard_model(model, cfg, groups)
    held = {True: 0, False: 0}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        local = comm.local_tensor(p)
        held[is_expert_parallel(p)] += local.numel() * local.element_size()
    return StateBytes(dense=held[False], expert=held[True], tensors=len(params), gathered_block=gathered_block,
                      total_params=dense_total + expert_total, expert_params=expert_total)


def tokens_per_micro_batch(cfg: Config, world: int) -> int:
    t = cfg.train
    return t.global_batch_size // (world * t.grad_accum) * cfg.data.seq_len


def activation_bytes(cfg: Config, tokens: int, checkpointing: str) -> int:
    """Bytes autograd keeps for backward after one micro-batch's forward of ``tokens`` tokens on
    one rank, with routing spread evenly (each rank's experts receive ``tokens * top_k`` rows).

    Counted from the tensors each module saves (tests/test_plan.py compares this with autograd's
    own count). ``block`` keeps each block's input only, ``moe`` each MoE FFN's input instead of
    its internals; a checkpointed block's own activations come back during its backward
    (``backward_working_bytes``).
    """
    blocks = [_block_bytes(cfg, tokens, index, checkpointing) for index in range(cfg.model.n_layers)]
    return sum(blocks) + _head_bytes(cfg, tokens)


def backward_working_bytes(cfg: Config, tokens: int, checkpointing: str) -> int:
    """What a block's backward holds besides the saved activations: the gradients of its
    activations (about their size), and, when it was checkpointed, the activations recomputation
    rebuilds for it (the whole block under ``block``, the MoE FFN's internals under ``moe``)."""
    full = [_block_bytes(cfg, tokens, index, "none") for index in range(cfg.model.n_layers)]
    rebuilt = [f - _block_bytes(cfg, tokens, index, checkpointing) for index, f in enumerate(full)]
    return max(full) + max(rebuilt)


def _block_bytes(cfg: Config, tokens: int, index: int, checkpointing: str) -> int:
    m, e = cfg.model, cfg.moe
    d, a = m.d_model, ACTIVATION_BYTES[cfg.train.dtype]
    if checkpointing == "block":
        return tokens * d * FP32  # the block's input (the fp32 residual stream)
    heads, kv_heads, head_dim = m.n_heads, m.n_kv_heads, m.effective_head_dim
    norm = 2 * d * FP32 + FP32  # input, normalised input, 1/rms

    def inputs_of(projections: int) -> int:  # autocast casts the same input once per projection
        return d * FP32 if a == FP32 else projections * d * a

    attention = (
        norm + inputs_of(3)  # q, k and v projections' input
        + (heads + 2 * kv_heads) * head_dim * a  # q and k after RoPE, v
        + heads * head_dim * a + heads * FP32  # attention output, log-sum-exp
    )
    if m.qk_norm:
        attention += 2 * (heads + kv_heads) * head_dim * FP32 + (heads + kv_heads) * FP32
    per_token = attention + norm
    if not m.is_moe_layer(index):
        per_token += inputs_of(2) + 4 * m.dense_ffn_dim * a  # SwiGLU: input; gate, silu(gate), up, product
        return tokens * per_token
    if checkpointing == "moe":
        return tokens * (per_token + d * FP32)
    k, n, f = e.top_k, e.num_experts, e.expert_ffn_dim
    router = d * FP32 + n * FP32 * 3 + k * (INT64 + FP32) + FP32  # input, logits and the losses' softmaxes
    rows = k * (d * a + 2 * f * a + f * a + 2 * INT64)  # dispatched rows, [gate|up], activation, row order
    combine = k * d * a  # expert outputs weighted back onto tokens
    per_token += router + rows + combine
    if e.num_shared_experts:
        per_token += inputs_of(2) - d * FP32 * (a == FP32) + 4 * e.effective_shared_expert_ffn_dim * e.num_shared_experts * a
    return tokens * per_token


def _head_bytes(cfg: Config, tokens: int) -> int:
    d, v, a = cfg.model.d_model, cfg.model.vocab_size, ACTIVATION_BYTES[cfg.train.dtype]
    # final norm, output projection's input, log-softmax of the logits (fp32), token ids
    return tokens * (2 * d * FP32 + FP32 + d * a + v * FP32 + INT64)


def cast_weight_bytes(cfg: Config, checkpointing: str) -> int:
    """Replicated bf16: autocast keeps, for backward, a bf16 copy of every matrix it multiplies
    outside a checkpointed region (the router multiplies in fp32). FSDP gathers the weights in
    bf16 instead: no copies (its gathered weights are ``StateBytes.gathered_block``)."""
    if cfg.train.dtype != "bf16" or cfg.parallel.dp_shard:
        return 0
    m, e = cfg.model, cfg.moe
    d, head_dim = m.d_model, m.effective_head_dim
    numel = m.vocab_size * d  # the output projection
    if checkpointing != "block":
        for index in range(m.n_layers):
            numel += (2 * m.n_heads + 2 * m.n_kv_heads) * head_dim * d
            if not m.is_moe_layer(index):
                numel += 3 * d * m.dense_ffn_dim
            elif checkpointing == "none":
                numel += 3 * d * e.expert_ffn_dim * e.num_experts // cfg.parallel.ep
                numel += 3 * d * e.effective_shared_expert_ffn_dim * e.num_shared_experts
    return 2 * numel


def peak_bytes(cfg: Config, world: int, state: StateBytes, checkpointing: str) -> int:
    """The most tensor bytes a step holds at once: weights and AdamW state, plus the larger of a
    step's two crowded moments (an upper estimate of each; docs/scaling.md compares it with
    real ranks).

    - The start of backward: every saved activation, the logits and their gradient, one block's
      backward (``backward_working_bytes``) and, replicated bf16, autocast's weight copies; with
      FSDP also the block's gathered weights, the next block's prefetched ones and the block's
      unsharded gradients in fp32 (the reduce-scatter's input). Weight gradients are few yet.
    - The end of backward: every weight gradient, the activations freed, and as much again: the
      replicated engine's flattened gradient buckets, or AdamW's foreach temporaries. Between
      the two, a block's activations are freed as its gradients appear; with both spread evenly
      over the blocks, no moment holds more than the larger of the two.
    """
    tokens = tokens_per_micro_batch(cfg, world)
    a = ACTIVATION_BYTES[cfg.train.dtype]
    logits = tokens * cfg.model.vocab_size * (a + FP32)
    gathered = 2 * state.gathered_block + state.gathered_block // a * FP32 if cfg.parallel.dp_shard else 0
    start_of_backward = (activation_bytes(cfg, tokens, checkpointing) + backward_working_bytes(cfg, tokens, checkpointing)
                         + cast_weight_bytes(cfg, checkpointing) + logits + gathered)
    end_of_backward = 2 * state.grads
    return state.params + state.optimizer + max(start_of_backward, end_of_backward)


def comm_bytes_per_step(cfg: Config, world: int, state: StateBytes) -> dict[str, int]:
    """Bytes one rank sends per optimizer step, by kind, with routing spread evenly."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    ep, dp = cfg.parallel.ep, world // cfg.parallel.ep
    tokens = tokens_per_micro_batch(cfg, world)
    layer = LayerComm(e.num_experts, m.d_model, e.top_k, ep, tokens,
                      backend="nccl", activation_bytes=ACTIVATION_BYTES[t.dtype])
    moe_layers = sum(m.is_moe_layer(i) for i in range(m.n_layers))
    out: dict[str, int] = {}
    for kind, nbytes in layer.bytes_by_kind().items():
        out[kind] = nbytes * moe_layers * t.grad_accum
    if t.activation_checkpointing != "none" and "token_all_to_all" in out:
        out["token_all_to_all"] += out["token_all_to_all"] // 2  # the forward's half, again in backward
    a = ACTIVATION_BYTES[t.dtype]
    if cfg.parallel.dp_shard:
        # Ring collectives: a rank sends its shard to each other rank of the group (dense: the
        # world; experts: EDP), gathered for forward and again for backward of every micro-batch.
        peers = (world - 1) * state.dense + (dp - 1) * state.expert
        out["fsdp_all_gather"] = 2 * t.grad_accum * peers // FP32 * a
        out["fsdp_reduce_scatter"] = peers
    elif world > 1:
        out["grad_all_reduce"] = 2 * (world - 1) * state.dense // world + 2 * (dp - 1) * state.expert // dp
    return out

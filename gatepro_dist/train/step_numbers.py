"""The numbers people size jobs with, for both engines: model FLOPs per token, TFLOP/s per rank, MFU,
peak memory, and the split of a step's time into data wait, forward+backward and optimizer.

Nothing here reads the device: FLOPs come from the config, memory from the allocator's host-side
counters (or the process's peak RSS on the CPU), times from the host clock -- on CUDA from events,
read one step late, when the step's one host read has already waited for them.
"""
from __future__ import annotations

import resource
import sys
import time

import torch

from ..config import Config

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by a substring of torch.cuda.get_device_name,
# most specific first. MFU is reported against these unless train.peak_tflops says otherwise.
KNOWN_BF16_PEAK_TFLOPS = (
    ("GB200", 2500.0), ("B200", 2250.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0),
)


def matmul_params_per_token(cfg: Config) -> int:
    """Weights one token multiplies by in a forward pass (the *active* parameters that do
    matmuls): attention projections, each layer's router and its top-k experts (plus shared
    experts) or its dense FFN, and the output head. Embedding lookups and norms do no matmul."""
    m, moe = cfg.model, cfg.moe
    attn_width, kv_width = m.n_heads * m.effective_head_dim, m.n_kv_heads * m.effective_head_dim
    attention = m.d_model * (attn_width + 2 * kv_width) + attn_width * m.d_model
    moe_ffn = (m.d_model * moe.num_experts  # router
               + moe.top_k * 3 * m.d_model * moe.expert_ffn_dim
               + 3 * m.d_model * (moe.shared_expert_ffn_dim or moe.expert_ffn_dim) * moe.num_shared_experts
               + (m.d_model if moe.num_shared_experts and moe.shared_expert_gate else 0))
    dense_ffn = 3 * m.d_model * m.dense_ffn_dim
    layers = sum(attention + (moe_ffn if m.is_moe_layer(i) else dense_ffn) for i in range(m.n_layers))
    return layers + m.d_model * m.vocab_size


def flops_per_token(cfg: Config, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward): ``6 * matmul_params_per_token`` plus the
    attention scores and their weighted sum, ``12 * n_layers * seq_len * n_heads * head_dim``
    (forward 2 matmuls of 2 * seq_len * width FLOPs per token, backward twice that). Like PaLM's and
    Megatron's MFU, the attention term counts the full seq_len x seq_len square, as
    ``torch.utils.flop_counter`` does for SDPA, although a causal kernel skips half of it."""
    m = cfg.model
    seq_len = cfg.data.seq_len if seq_len is None else seq_len
    attention_scores = 12 * m.n_layers * seq_len * m.n_heads * m.effective_head_dim
    return 6.0 * matmul_params_per_token(cfg) + attention_scores


def peak_tflops(cfg: Config, device: torch.device) -> float | None:
    """The peak MFU is measured against: ``train.peak_tflops`` when set, else the GPU's dense bf16
    peak from the table above, else None (the CPU, or an unknown GPU)."""
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_BF16_PEAK_TFLOPS if key in name), None)


def peak_memory_gib(device: torch.device) -> dict[str, float]:
    """The peak since the last ``reset_peak_memory``: CUDA's allocated and reserved bytes (host-side
    allocator counters, no sync); on the CPU the process's peak resident set (since it started)."""
    if device.type == "cuda":
        return {"max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"max_mem_gib": peak_kib / (2**30 if sys.platform == "darwin" else 2**20)}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


PHASES = ("data_s", "fwd_bwd_s", "optimizer_s")


class StepTimer:
    """Where a step's time goes: ``mark("data_s")`` after a batch is on the device,
    ``mark("fwd_bwd_s")`` after a backward (and the gradient reduction), ``mark("optimizer_s")``
    after the update; each phase is the time since the previous mark, summed over a step's
    micro-batches. On the CPU these are host times. On CUDA the host only launches work, so each
    mark also records an event, and ``split`` returns the previous step's event times (complete by
    then: this step's host read waited for the device), without any synchronisation of its own."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.previous_events: list = []
        self.events: list = []  # (phase, event), the first phase None: the step's start
        self.host: dict[str, float] = {}
        self.began = self.last = 0.0

    def start(self) -> None:
        self.began = self.last = time.perf_counter()
        self.host = {}
        if self.cuda:
            self.previous_events, self.events = self.events, [(None, self._event())]

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.host[phase] = self.host.get(phase, 0.0) + now - self.last
        self.last = now
        if self.cuda:
            self.events.append((phase, self._event()))

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def split(self) -> dict[str, float | None]:
        if not self.cuda:
            return {phase: self.host.get(phase, 0.0) for phase in PHASES}
        if not self.previous_events:
            return {phase: None for phase in PHASES}
        seconds = dict.fromkeys(PHASES, 0.0)
        for (_, start), (phase, end) in zip(self.previous_events, self.previous_events[1:]):
            seconds[phase] += start.elapsed_time(end) / 1e3
        return seconds

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def throughput_numbers(cfg: Config, device: torch.device, tokens_per_s: float, world_size: int) -> dict:
    """TFLOP/s per rank and MFU of a line whose tokens/s (all ranks) is ``tokens_per_s``."""
    tflops = flops_per_token(cfg) * tokens_per_s / world_size / 1e12
    peak = peak_tflops(cfg, device)
    return {"tflops_per_rank": tflops, "mfu": None if peak is None else tflops / peak}

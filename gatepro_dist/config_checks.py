"""Checks on a whole configuration before a job starts: values, shapes, the GatePro schedule, the
world size, paths on the filesystem and the DeepSpeed settings.

    cfg = validate(load_config("configs/quickstart.yaml", overrides), world_size=2)

`validate` raises `ConfigError` (one line naming the key and the fix) at the first problem. It reads
the filesystem but creates nothing and touches no process group, so a job can be refused before
any rank has joined it. Parsing a single key (types, choices, unknown keys) is `config.py`'s job.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Any

from .config import _LEAVES, Config, ConfigError, GateProConfig, _coerce, _get

_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads",
    "model.head_dim", "model.rope_base", "model.norm_eps", "model.max_seq_len",
    "model.dense_ffn_dim", "model.moe_every", "moe.num_experts", "moe.expert_ffn_dim",
    "moe.shared_expert_ffn_dim", "moe.capacity_factor", "parallel.ep", "parallel.timeout_s",
    "data.seq_len", "data.max_bytes", "train.steps", "train.global_batch_size",
    "train.grad_accum", "train.lr", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.stats_every", "train.save_every", "train.eps", "train.keep_last", "train.peak_tflops",
)
_NON_NEGATIVE = (
    "model.first_dense_layers", "moe.num_shared_experts", "router.aux_loss_coef",
    "router.z_loss_coef", "router.init_std", "router.gatepro.penalty", "router.bias.update_rate", "train.seed",
    "train.warmup_steps", "train.weight_decay", "train.grad_clip",
)
# key -> (low, high, low_inclusive, high_inclusive)
_RANGES = {
    "data.val_fraction": (0.0, 0.5, False, True),
    "train.min_lr_ratio": (0.0, 1.0, True, True),
    "train.decay_fraction": (0.0, 1.0, False, True),
    "train.beta1": (0.0, 1.0, True, False),
    "train.beta2": (0.0, 1.0, True, False),
}


# cuBLAS is deterministic only with one of these workspace settings (CUDA's reproducibility notes).
DETERMINISTIC_CUBLAS = (":4096:8", ":16:8")


def check_cublas_workspace(deterministic: bool, environ=os.environ) -> None:
    """``train.deterministic`` with a CUBLAS_WORKSPACE_CONFIG that cuBLAS cannot be deterministic
    with is contradictory input: refused here, before any group exists (the GPU would refuse it
    later; the trainer sets the variable when it is unset)."""
    workspace = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if deterministic and workspace is not None and workspace not in DETERMINISTIC_CUBLAS:
        raise ConfigError(
            f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG in {DETERMINISTIC_CUBLAS} on CUDA, "
            f"but the environment has {workspace!r}; unset it or set CUBLAS_WORKSPACE_CONFIG=:4096:8")


def _fail(key: str, value: Any, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} {problem}; {fix}")


def validate(cfg: Config, world_size: int) -> Config:
    """Check `cfg` for a job of `world_size` processes; raise ConfigError at the first problem.
    Reads the filesystem (run_dir, resume, data paths) but creates nothing. Returns `cfg`."""
    for key, (tp, _) in _LEAVES.items():  # configs built in code skipped load_config's checks
        value = _coerce(key, _get(cfg, key), tp, "in the config object")
        if isinstance(value, float) and not math.isfinite(value):
            raise _fail(key, value, "is not finite", f"set {key} to a finite number")
    _check_values(cfg)
    _check_shapes(cfg)
    _check_schedule(cfg.router.gatepro, cfg.moe.num_experts)
    _check_reading(cfg.router)
    _check_world(cfg, world_size)
    _check_paths(cfg)
    _check_deepspeed(cfg, world_size)
    _check_metrics(cfg)
    check_cublas_workspace(cfg.train.deterministic)
    return cfg


def _check_values(cfg: Config) -> None:
    for key in _POSITIVE:
        value = _get(cfg, key)
        if value is not None and value <= 0:
            raise _fail(key, value, "must be > 0", f"set {key} to a positive value")
    for key in _NON_NEGATIVE:
        value = _get(cfg, key)
        if value is not None and value < 0:
            raise _fail(key, value, "must be >= 0", f"set {key} to zero or more")
    for key, (lo, hi, lo_in, hi_in) in _RANGES.items():
        value = _get(cfg, key)
        if not ((lo <= value if lo_in else lo < value) and (value <= hi if hi_in else value < hi)):
            span = f"{'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
            raise _fail(key, value, f"is outside {span}", f"choose {key} in {span}")


def _check_shapes(cfg: Config) -> None:
    m, moe = cfg.model, cfg.moe
    if moe.top_k < 1 or moe.top_k > moe.num_experts:
        raise _fail("moe.top_k", moe.top_k, f"must be between 1 and moe.num_experts={moe.num_experts}",
                    f"choose 1 <= moe.top_k <= {moe.num_experts}")
    if m.n_heads % m.n_kv_heads:
        raise _fail("model.n_kv_heads", m.n_kv_heads, f"does not divide model.n_heads={m.n_heads}",
                    "choose model.n_kv_heads that divides model.n_heads")
    if m.head_dim is None and m.d_model % m.n_heads:
        raise _fail("model.d_model", m.d_model, f"is not divisible by model.n_heads={m.n_heads}",
                    "choose model.d_model divisible by model.n_heads or set model.head_dim")
    if m.effective_head_dim % 2:
        raise _fail("model.head_dim", m.effective_head_dim, "is odd, but RoPE rotates pairs of channels",
                    "choose an even model.head_dim (or d_model / n_heads)")
    if m.first_dense_layers > m.n_layers:
        raise _fail("model.first_dense_layers", m.first_dense_layers,
                    f"exceeds model.n_layers={m.n_layers}", "choose at most model.n_layers")
    if cfg.data.seq_len > m.max_seq_len:
        raise _fail("data.seq_len", cfg.data.seq_len, f"exceeds model.max_seq_len={m.max_seq_len}",
                    "lower data.seq_len or raise model.max_seq_len")
    for i, layer in enumerate(m.dense_layers):
        if not 0 <= layer < m.n_layers:
            raise _fail(f"model.dense_layers[{i}]", layer, f"is not a layer index of model.n_layers={m.n_layers}",
                        f"list layer indices in [0, {m.n_layers - 1}]")
    if isinstance(cfg.data.source, list) and not cfg.data.source and not cfg.data.mix:
        raise _fail("data.source", [], "is an empty list", "name at least one path or use 'stdlib'")
    if cfg.train.dtype == "bf16" and moe.grouped_gemm:
        _check_grouped_gemm_alignment(m.d_model, moe.expert_ffn_dim)


def _nearest_multiple(value: int, of: int) -> int:
    """The multiple of ``of`` closest to ``value`` (the larger one on a tie), at least ``of``."""
    return max(of, (value + of // 2) // of * of)


def _check_grouped_gemm_alignment(d_model: int, expert_ffn_dim: int) -> None:
    """bf16 grouped GEMM (sm90/sm100) needs every row of its operands 16-byte aligned: 8 bf16 values.

    Shapes it cannot take run anyway, on a slower path or not at all, depending on the torch version;
    refuse them here, where a CPU run would not notice.
    """
    for key, value in (("model.d_model", d_model), ("moe.expert_ffn_dim", expert_ffn_dim)):
        if value % 8:
            raise _fail(key, value, "is not a multiple of 8, which the bf16 grouped GEMM needs (16-byte rows)",
                        f"set {key}={_nearest_multiple(value, 8)} (the nearest multiple of 8), "
                        "or moe.grouped_gemm=false, or train.dtype=fp32")


def _check_schedule(gatepro: GateProConfig, num_experts: int) -> None:
    key, previous = "router.gatepro.schedule", -1
    for i, entry in enumerate(gatepro.schedule):
        step, on = entry
        if step < 0:
            raise _fail(f"{key}[{i}]", list(entry), "has a negative step", "use steps >= 0")
        if step <= previous:
            raise _fail(f"{key}[{i}]", list(entry), f"does not come after step {previous}",
                        f"list {key} entries with strictly increasing steps")
        previous = step
    can_be_on = gatepro.enabled or any(on for _, on in gatepro.schedule)
    if can_be_on and num_experts < 2:
        raise _fail("moe.num_experts", num_experts, "leaves GatePro no expert to pair with",
                    "use moe.num_experts >= 2 or set router.gatepro.enabled=false")


def _check_reading(router) -> None:
    if router.gatepro.space == "probs" and router.bias.enabled:
        raise _fail("router.gatepro.space", "probs", "cannot be combined with router.bias.enabled=true "
                    "(the balancing bias is in logit units)", "set router.gatepro.space=logits or router.bias.enabled=false")


def _check_world(cfg: Config, world_size: int) -> None:
    ep, t = cfg.parallel.ep, cfg.train
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world_size={world_size!r} must be a positive int; check WORLD_SIZE in the environment")
    if cfg.moe.num_experts % ep:
        raise _fail("moe.num_experts", cfg.moe.num_experts, f"is not divisible by parallel.ep={ep}",
                    "choose parallel.ep that divides moe.num_experts")
    if world_size % ep:
        raise _fail("parallel.ep", ep, f"does not divide the world size {world_size}",
                    f"choose parallel.ep from the divisors of {world_size}")
    if cfg.parallel.dp_shard and world_size == 1:
        raise _fail("parallel.dp_shard", True, "shards over the ranks of the job and this job has one process",
                    "set parallel.dp_shard=false, or launch 2 or more processes (torchrun --nproc-per-node=N)")
    if cfg.parallel.dp_shard and t.backend == "deepspeed":
        raise _fail("parallel.dp_shard", True, "is the native engine's FSDP2 sharding; DeepSpeed shards with ZeRO",
                    "set parallel.dp_shard=false and choose deepspeed.zero_stage, or train.backend=native")
    per_step = world_size * t.grad_accum
    if t.global_batch_size % per_step:
        raise _fail("train.global_batch_size", t.global_batch_size,
                    f"is not divisible by world_size*train.grad_accum={world_size}*{t.grad_accum}",
                    f"use a multiple of {per_step}")


def _read_only_filesystem(path: str) -> bool:
    """True on read-only mounts and pseudo filesystems (/proc, /sys): even root cannot write there."""
    try:
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        return True
    real = os.path.realpath(path)
    return any(real == p or real.startswith(p + "/") for p in ("/proc", "/sys"))


def _check_paths(cfg: Config) -> None:
    run_dir = cfg.train.run_dir
    if not run_dir.strip():
        raise _fail("train.run_dir", run_dir, "is empty", "name an output directory")
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise _fail("train.run_dir", run_dir, "exists and is a file", "choose a directory path or remove the file")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise _fail("train.run_dir", run_dir, f"lies under '{ancestor}', which is a file",
                    "choose a path whose parents are directories")
    if not os.access(ancestor, os.W_OK | os.X_OK) or _read_only_filesystem(ancestor):
        raise _fail("train.run_dir", run_dir, f"cannot be written: '{ancestor}' is not writable",
                    "choose a writable location or fix its permissions")
    resume = cfg.train.resume
    if resume not in ("none", "auto") and not os.path.exists(resume):
        raise _fail("train.resume", resume, "is neither 'none', 'auto' nor an existing checkpoint path",
                    "pass 'none', 'auto' or the path of a saved checkpoint directory")
    tokenizer = cfg.data.tokenizer
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise _fail("data.tokenizer", tokenizer, "is not an existing file",
                    "point data.tokenizer at a local tokenizer.json, or set it to null for bytes")
    _check_sources(cfg)


def _source_missing(path: str) -> str | None:
    """Why `path` names no data (None when it does): a file, a non-empty directory, a glob with
    matches, or a Megatron prefix (PREFIX.bin + PREFIX.idx)."""
    if path == "stdlib":
        return None
    if os.path.isdir(path):
        return None if any(os.scandir(path)) else "is an empty directory"
    if os.path.isfile(path):
        return None if os.path.getsize(path) else "is an empty file"
    if os.path.isfile(path + ".bin") and os.path.isfile(path + ".idx"):
        return None
    if glob.has_magic(path):
        return None if glob.glob(path, recursive=True) else "is a pattern that matches no file"
    return "is neither 'stdlib' nor an existing path"


def _check_sources(cfg: Config) -> None:
    """Every data path exists and holds something; mixture weights are positive. What is inside the
    files (dtypes, sizes, token ids, JSON lines) is checked by the data loader, also before any
    process group exists."""
    d = cfg.data
    named: list[tuple[str, Any]] = []
    if d.mix:
        named += [(f"data.mix[{i}].source", e.source) for i, e in enumerate(d.mix)]
        for i, entry in enumerate(d.mix):
            if not entry.weight > 0:
                raise _fail(f"data.mix[{i}].weight", entry.weight, "must be > 0",
                            "give every mixture entry a positive weight (they are normalised to sum to 1)")
    else:
        named.append(("data.source", d.source))
    if isinstance(d.val_source, list) and d.val_source and not isinstance(d.val_source[0], str):
        named += [(f"data.val_source[{i}].source", e.source) for i, e in enumerate(d.val_source)]
        for i, entry in enumerate(d.val_source):
            if not entry.weight > 0:
                raise _fail(f"data.val_source[{i}].weight", entry.weight, "must be > 0",
                            "give every held-out entry a positive weight")
    elif d.val_source is not None:
        named.append(("data.val_source", d.val_source))
    for key, source in named:
        paths = source if isinstance(source, list) else [source]
        if not paths:
            raise _fail(key, [], "is an empty list", "name at least one path or use 'stdlib'")
        for path in paths:
            problem = _source_missing(path)
            if problem:
                raise _fail(key, path, problem, f"point {key} at text, .jsonl, token shards (.bin/.npy), a "
                            "gatepro-convert tokenize directory or a Megatron prefix, or use 'stdlib'")
    if not d.text_key:
        raise _fail("data.text_key", d.text_key, "is empty", "name the JSON field that holds each document's text")
    if d.eos_id is not None and not 0 <= d.eos_id < cfg.model.vocab_size:
        raise _fail("data.eos_id", d.eos_id, f"is not a token id of model.vocab_size={cfg.model.vocab_size}",
                    f"choose data.eos_id in [0, {cfg.model.vocab_size - 1}] or raise model.vocab_size")


def _check_deepspeed(cfg: Config, world_size: int) -> None:
    """The deepspeed.* keys, and the user JSON merged with the generated DeepSpeed config.

    Checked whatever the backend, so a bad key is reported before a run that would use it.
    """
    from .backends.deepspeed_config import deepspeed_config  # pure: no torch, no deepspeed

    if cfg.train.backend == "deepspeed" and cfg.train.async_save:
        raise _fail("train.async_save", True, "is not supported with train.backend=deepspeed (its engine writes "
                    "its own checkpoints, blocking)", "set train.async_save=false or train.backend=native")
    deepspeed_config(cfg, world_size)


def _check_metrics(cfg: Config) -> None:
    """An experiment tracker that cannot be imported fails here, on every rank, before any group."""
    from .train.wandb_run import MISSING_WANDB  # no wandb import: only whether it is installed

    mode = cfg.metrics.wandb
    if mode is not None and _missing_package("wandb"):
        raise ConfigError(MISSING_WANDB.format(mode=mode))


def _missing_package(name: str) -> bool:
    """Whether ``import name`` would fail for want of the package (without importing it: wandb
    takes seconds). A ``None`` entry in sys.modules is how Python marks an import as blocked."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is None
    return importlib.util.find_spec(name) is None

"""The one configuration schema: nested dataclasses, loaded from YAML, overridden by dotted keys.

    cfg = load_config("configs/quickstart.yaml", ["moe.top_k=4", "router.gatepro.penalty=1e-3"])
    validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))   # config_checks.py

Parsing (`load_config`) rejects unknown keys and wrong types; `config_checks.validate` checks
everything that depends on several keys, on the world size or on the filesystem. Both raise
`ConfigError`, whose
message is one line naming the key and the fix. Nothing here touches torch or creates files, so the
whole config can be checked before any process group exists.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is a single line that names the key and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help line (shown by `help_text()`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _section(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    vocab_size: int = _f(256, "vocabulary size (256 = bytes)")
    d_model: int = _f(256, "residual stream width")
    n_layers: int = _f(4, "transformer blocks")
    n_heads: int = _f(4, "query heads")
    n_kv_heads: int = _f(2, "key/value heads (grouped-query attention); must divide n_heads")
    head_dim: Optional[int] = _f(None, "per-head width; null means d_model // n_heads")
    rope_base: float = _f(10000.0, "RoPE base frequency")
    qk_norm: bool = _f(False, "RMS-normalise queries and keys (see qk_norm_scope)")
    qk_norm_scope: Literal["head", "projection"] = _f(
        "head", "what qk_norm normalises: each head's vector (Qwen3-MoE) or the whole q/k projection (OLMoE)")
    qkv_bias: bool = _f(False, "bias on the query/key/value projections (Qwen2-style)")
    tie_embeddings: bool = _f(True, "share input embedding and output projection")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon")
    max_seq_len: int = _f(512, "longest sequence the RoPE cache covers")
    dense_ffn_dim: int = _f(1024, "hidden width of dense (non-MoE) FFN layers")
    moe_every: int = _f(1, "layer i is MoE iff i >= first_dense_layers and (i - first_dense_layers) % moe_every == 0")
    first_dense_layers: int = _f(0, "leading layers that use a dense FFN")
    dense_layers: list[int] = _f([], "further layer indices with a dense FFN (Qwen-MoE's mlp_only_layers), e.g. [1, 3]")

    @property
    def effective_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, layer_index: int) -> bool:
        if layer_index in self.dense_layers:
            return False
        offset = layer_index - self.first_dense_layers
        return offset >= 0 and offset % self.moe_every == 0


@dataclass
class MoEConfig:
    num_experts: int = _f(16, "routed experts per MoE layer (all ranks together)")
    top_k: int = _f(2, "experts chosen per token")
    expert_ffn_dim: int = _f(256, "hidden width of one routed expert (SwiGLU)")
    num_shared_experts: int = _f(0, "always-on experts added to every token")
    shared_expert_ffn_dim: Optional[int] = _f(None, "hidden width of a shared expert; null means expert_ffn_dim")
    shared_expert_gate: bool = _f(False, "scale the shared-expert output by a learned sigmoid gate")
    capacity_factor: Optional[float] = _f(None, "null = dropless; else tokens per expert capped at cf * tokens * k / N")
    drop_policy: Literal["position", "probs"] = _f("position", "which tokens an over-full expert drops")
    grouped_gemm: bool = _f(True, "grouped GEMM for local experts (false: per-expert loop)")

    @property
    def effective_shared_expert_ffn_dim(self) -> int:
        return self.shared_expert_ffn_dim if self.shared_expert_ffn_dim is not None else self.expert_ffn_dim


@dataclass
class GateProConfig:
    enabled: bool = _f(True, "GatePro penalty on; with a schedule, the state before its first entry")
    penalty: float = _f(1e-4, "lambda subtracted from a losing expert's logit (the paper's 1e-4)")
    mode: Literal["penalty", "mask"] = _f("penalty", "penalty: a loser's score drops by lambda (the paper's equations); mask: losers leave the token's top-k (its prose)")
    pairing: Literal["similar", "random"] = _f("similar", "each expert's rival: its most similar expert, or a fixed seeded derangement (the placebo)")
    space: Literal["logits", "probs"] = _f("logits", "compare and penalise logits, or softmax probabilities over all experts")
    schedule: list[tuple[int, bool]] = _f([], "[[step, on], ...] switches, e.g. [[0, true], [300, false]]")

    def enabled_at(self, step: int) -> bool:
        return gatepro_enabled_at(self, step)


@dataclass
class BiasConfig:
    enabled: bool = _f(False, "aux-loss-free per-expert routing bias")
    update_rate: float = _f(1e-3, "bias step per optimizer step towards balanced load")


@dataclass
class RouterConfig:
    aux_loss_coef: float = _f(0.01, "Switch-style load-balancing loss weight (sees raw logits)")
    z_loss_coef: float = _f(0.001, "router z-loss weight")
    normalize_topk: bool = _f(True, "mixture weights = softmax over the selected k only")
    init_std: Optional[float] = _f(None, "std of the router rows at init; null = 1/sqrt(d_model); 0 = all rows zero (every logit tied at step 0)")
    logit_precision: Literal["fp32", "bf16", "bf16_fp32_penalty"] = _f("fp32", "router logits as computed (fp32), rounded through bf16 with the penalty in bf16, or rounded with the penalty in fp32 (emulated on any device)")
    check_pairs: bool = _f(False, "debug: verify GatePro pairings agree across EP ranks")
    gatepro: GateProConfig = _section(GateProConfig, "GatePro expert competition")
    bias: BiasConfig = _section(BiasConfig, "aux-loss-free load balancing")


@dataclass
class ParallelConfig:
    ep: int = _f(1, "expert-parallel group size; must divide world size and num_experts")
    dp_shard: bool = _f(False, "shard parameters, gradients and AdamW state with FSDP2 (dense over all ranks, experts over their EDP ranks) instead of replicating them")
    backend: Literal["auto", "gloo", "nccl"] = _f("auto", "torch.distributed backend (auto: nccl on GPU else gloo)")
    timeout_s: float = _f(600.0, "collective timeout in seconds")


@dataclass
class MixEntry:
    """One source of a mixture: `{source: PATH, weight: 0.7}` (name: how metrics call it; default the path's last part)."""

    source: Union[str, list[str]] = "stdlib"
    weight: float = 1.0
    name: Optional[str] = None


@dataclass
class DataConfig:
    source: Union[str, list[str]] = _f(
        "stdlib", "'stdlib', or path(s)/globs: text files/dirs, .jsonl(.gz), .bin/.npy token shards, a "
        "gatepro-convert tokenize directory, or a Megatron PREFIX (PREFIX.bin + PREFIX.idx)")
    mix: list[MixEntry] = _f([], "a mixture instead of data.source: [{source: PATH, weight: 0.7}, {source: PATH, "
                                 "weight: 0.3}]; each global batch is drawn by weight")
    val_source: Optional[Union[str, list[str], list[MixEntry]]] = _f(
        None, "held-out data for evaluation (any form of data.source, or a mixture list: a loss per source); "
              "null = the last val_fraction of each training source")
    bin_dtype: Literal["uint16", "uint32"] = _f("uint16", "token dtype of flat .bin files (.npy, Megatron and tokenized dirs carry theirs)")
    seq_len: int = _f(128, "tokens per training sequence")
    val_fraction: float = _f(0.02, "share of the data held out for evaluation, in (0, 0.5]")
    max_bytes: int = _f(16777216, "read at most this many bytes of text")
    tokenizer: Optional[str] = _f(None, "null = bytes; else a local tokenizer.json (Hugging Face `tokenizers`) that encodes text sources")
    text_key: str = _f("text", "the field of each .jsonl line that holds the document's text")
    eos_id: Optional[int] = _f(None, "end-of-document token id; null = the source's own (a tokenize manifest names it); "
                                     "with text sources, each document is followed by it")
    document_mask: bool = _f(False, "attention stays inside each document (block-causal) and positions restart at "
                                    "each document; needs an end-of-document id")


@dataclass
class TrainConfig:
    steps: int = _f(300, "optimizer steps")
    run_dir: str = _f("runs/quickstart", "output directory (metrics, checkpoints, resolved config)")
    seed: int = _f(0, "random seed")
    global_batch_size: int = _f(16, "sequences per optimizer step, all ranks together")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(3e-3, "peak learning rate")
    lr_schedule: Literal["cosine", "wsd", "linear", "constant"] = _f(
        "cosine", "after warmup: cosine or linear decay to min_lr_ratio * lr at train.steps; wsd (warmup-"
        "stable-decay: flat, then the last train.decay_fraction of train.steps decays); constant")
    decay_fraction: float = _f(0.2, "wsd: the fraction of train.steps that decays (the last ones)")
    decay_shape: Literal["linear", "1-sqrt"] = _f("linear", "wsd: shape of the decay to min_lr_ratio * lr")
    allow_schedule_change: bool = _f(
        False, "resume even when a changed train.steps rewrites the lr of steps already taken (cosine, linear)")
    min_lr_ratio: float = _f(0.1, "final lr as a fraction of peak (cosine, linear and wsd decay)")
    warmup_steps: int = _f(30, "linear warmup steps")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global grad-norm clip (0 = off)")
    dtype: Literal["fp32", "bf16"] = _f("fp32", "compute dtype (router logits stay fp32)")
    deterministic: bool = _f(False, "force deterministic kernels")
    activation_checkpointing: Literal["none", "moe", "block"] = _f(
        "none", "recompute activations in backward instead of keeping them: none, moe (each MoE FFN: router, "
        "dispatch, experts, combine) or block (each whole transformer block)")
    log_every: int = _f(1, "steps between metric lines")
    eval_every: int = _f(50, "steps between evaluations")
    eval_batches: int = _f(4, "batches per evaluation")
    stats_every: int = _f(10, "steps between router statistics (zero-token count, S metrics)")
    save_every: int = _f(100, "steps between checkpoints")
    keep_last: Optional[int] = _f(None, "keep only the newest K checkpoints (never the one resumed from); null = keep all")
    async_save: bool = _f(False, "write checkpoints in the background (DCP async_save) while training goes on")
    compile: bool = _f(False, "torch.compile each transformer block (the MoE dispatch stays eager)")
    peak_tflops: Optional[float] = _f(None, "peak TFLOP/s per rank for MFU; null = the GPU's dense bf16 peak if known, else no MFU")
    resume: str = _f("none", "'none', 'auto' (latest in run_dir) or a checkpoint directory")
    backend: Literal["native", "deepspeed"] = _f("native", "training engine")
    progress: bool = _f(True, "show a progress line on rank 0")
    nan_policy: Literal["skip", "stop"] = _f("skip", "on a non-finite loss: skip the step or stop")

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences one rank processes per micro-batch."""
        return self.global_batch_size // (world_size * self.grad_accum)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(0, "ZeRO stage for train.backend=deepspeed: 0 (none), 1 (optimizer states) or 2 (+ gradients)")
    config_path: Optional[str] = _f(None, "DeepSpeed JSON merged on top of the generated one (tuning keys only); null = none")


@dataclass
class MetricsConfig:
    wandb: Optional[Literal["offline", "online"]] = _f(
        None, "also log to Weights & Biases: offline (a local run, no network) or online; null = off")
    wandb_project: str = _f("gatepro_dist", "the W&B project name")


@dataclass
class Config:
    model: ModelConfig = _section(ModelConfig, "transformer shape")
    moe: MoEConfig = _section(MoEConfig, "mixture of experts")
    router: RouterConfig = _section(RouterConfig, "router and GatePro")
    parallel: ParallelConfig = _section(ParallelConfig, "process layout")
    data: DataConfig = _section(DataConfig, "training text")
    train: TrainConfig = _section(TrainConfig, "optimisation, logging, checkpoints")
    deepspeed: DeepSpeedConfig = _section(DeepSpeedConfig, "DeepSpeed engine (used when train.backend=deepspeed)")
    metrics: MetricsConfig = _section(MetricsConfig, "experiment trackers beyond metrics.jsonl and TensorBoard")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)


class _Dumper(yaml.SafeDumper):
    """Block mappings, flow lists: a schedule reads as `[[0, true], [300, false]]`."""


_Dumper.add_representer(
    list, lambda dumper, seq: dumper.represent_sequence("tag:yaml.org,2002:seq", seq, flow_style=True))


def gatepro_enabled_at(gatepro: GateProConfig, step: int) -> bool:
    """Whether GatePro is on at `step`: the last schedule entry at or before `step` decides;
    before the first entry (or with no schedule) `gatepro.enabled` holds."""
    on = gatepro.enabled
    for switch_step, switch_on in gatepro.schedule:
        if switch_step > step:
            break
        on = switch_on
    return bool(on)


# Keys left out of `config_hash`: they change how long a run goes, where it writes, how often it
# reports, how long a collective may wait, or what is kept for backward -- never the numbers one
# step computes -- so a run resumed with more steps (or a new run_dir) keeps its hash.
HASH_EXCLUDED_KEYS = (
    "train.steps", "train.resume", "train.run_dir", "train.log_every", "train.eval_every",
    "train.stats_every", "train.save_every", "train.progress", "parallel.timeout_s",
    "train.activation_checkpointing", "train.keep_last", "train.async_save", "train.peak_tflops",
    "train.allow_schedule_change", "metrics.wandb", "metrics.wandb_project",
)


def config_hash(cfg: Config) -> str:
    """First 12 hex digits of sha256 over the resolved config minus HASH_EXCLUDED_KEYS."""
    flat = {k: v for k, v in flatten_keys(cfg.to_dict()).items() if k not in HASH_EXCLUDED_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


# ---- the key table --------------------------------------------------------------------------

def _leaves(cls: type, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, dataclasses.Field]] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_leaves(tp, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (tp, f)
    return out


_LEAVES = _leaves(Config)
_SECTIONS = {k.rsplit(".", i)[0] for k in _LEAVES for i in range(1, k.count(".") + 1)}


def all_keys() -> list[str]:
    """Every valid dotted key, in schema order."""
    return list(_LEAVES)


def _suggest(key: str) -> str:
    """The nearest valid key: one with the same last part (`top_k` -> `moe.top_k`), else the
    closest dotted key or section by difflib, else the key whose last part is closest."""
    leaf = key.rsplit(".", 1)[-1]
    known = list(_LEAVES) + sorted(_SECTIONS)
    close = [k for k in known if k.rsplit(".", 1)[-1] == leaf and k != key]
    close = close or difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        near = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in known], n=1)
        close = [k for k in known if near and k.rsplit(".", 1)[-1] == near[0]]
    return f"; did you mean '{close[0]}'?" if close else "; run `gatepro-train --help` for the valid keys"


def _unknown(key: str, origin: str) -> ConfigError:
    return ConfigError(f"unknown config key '{key}' ({origin}){_suggest(key)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if dataclasses.is_dataclass(tp):
        return "{" + ", ".join(f.name for f in dataclasses.fields(tp)) + "}"
    return tp.__name__


def _coerce(key: str, value: Any, tp: Any, origin: str) -> Any:
    """`value` as type `tp` (ints widen to float; numeric strings like YAML's '1e-4' become
    floats; bool is never an int), or ConfigError."""
    kind, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> ConfigError:
        if kind is tuple:
            fix = "write each entry as [step, true|false], e.g. [[0, true], [300, false]]"
        else:
            fix = f"set {key} to a value of type {_type_name(tp)}"
            example = _LEAVES[key][1].default if key in _LEAVES else None
            if example not in (None, dataclasses.MISSING):
                fix += f", e.g. {key}={example if isinstance(example, str) else json.dumps(example)}"
        got = f"{type(value).__name__} {value!r}"
        return ConfigError(f"{key}: expected {_type_name(tp)}, got {got} ({origin}); {fix}")

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if kind is Literal:
        if value in args and isinstance(value, str):
            return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{key}: {value!r} is not a valid choice ({origin}); choose one of {choices}")
    if kind in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option, origin)
            except ConfigError:
                continue
        raise bad()
    if kind is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(f"{key}[{i}]", item, args[0], origin) for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):  # an entry of a list such as data.mix: a mapping of its fields
        if isinstance(value, tp):
            value = dataclasses.asdict(value)
        if not isinstance(value, dict):
            raise bad()
        fields = {f.name: f for f in dataclasses.fields(tp)}
        hints = typing.get_type_hints(tp)
        for name in value:
            if name not in fields:
                raise ConfigError(f"{key}: unknown field '{name}' ({origin}); an entry has "
                                  f"{', '.join(fields)}, e.g. {{source: data/web, weight: 0.7}}")
        return tp(**{name: _coerce(f"{key}.{name}", item, hints[name], origin) for name, item in value.items()})
    if kind is tuple:  # fixed-length entries such as a schedule's [step, on]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        try:
            return [_coerce(key, item, a, origin) for item, a in zip(value, args)]
        except ConfigError:
            raise bad() from None
    raise TypeError(f"config type {tp!r} has no coercion")  # a schema bug, not a user error


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def flatten_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"moe": {"top_k": 2}}`` -> ``{"moe.top_k": 2}`` (nested mappings to dotted keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- loading --------------------------------------------------------------------------------

def config_from_dict(data: dict, origin: str = "dict") -> Config:
    """A Config from a (possibly partial) nested mapping; missing keys keep their defaults."""
    cfg = Config()
    if not isinstance(data, dict):
        raise ConfigError(f"config ({origin}) must be a mapping of sections, got {type(data).__name__}; "
                          f"write it as 'section: {{key: value}}'")
    for key, value in _flatten_sections(data, "", origin).items():
        _set(cfg, key, _coerce(key, value, _LEAVES[key][0], origin))
    return cfg


def _flatten_sections(data: dict, prefix: str, origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = f"{prefix}{raw_key}"
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section and must be a mapping ({origin}); "
                                  f"write it as '{raw_key}: {{key: value}}'")
            out.update(_flatten_sections(value, key + ".", origin))
        elif key in _LEAVES:
            out[key] = value
        else:
            raise _unknown(key, origin)
    return out


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, name = key.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


def _get(cfg: Config, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `key=value` strings to `cfg` in place, in order (later ones win), and return it.
    Values are parsed with yaml.safe_load; for string-typed keys the raw text is kept when YAML
    would read a non-string (`train.run_dir=007` stays "007")."""
    for item in overrides:
        origin = f"override '{item}'"
        if "=" not in item:
            key = item.strip().lstrip("-")
            raise ConfigError(f"override '{item}' has no '='; write it as key=value, "
                              f"e.g. {key if key in _LEAVES else 'train.steps'}=...")
        key, raw = (s.strip() for s in item.split("=", 1))
        key = key.lstrip("-")  # tolerate --train.steps=10
        if key in _SECTIONS:
            raise ConfigError(f"'{key}' is a section, not a key ({origin}); set one of its keys, "
                              f"e.g. {next(k for k in _LEAVES if k.startswith(key + '.'))}=...")
        if key not in _LEAVES:
            raise _unknown(key, origin)
        tp = _LEAVES[key][0]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        wants_text = tp is str or typing.get_origin(tp) is Literal or key in ("data.source", "data.tokenizer", "data.val_source")
        if wants_text and value is not None and not isinstance(value, (str, list)):
            value = raw  # e.g. train.run_dir=007 stays "007"
        _set(cfg, key, _coerce(key, value, tp, origin))
    return cfg


def load_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at `path` (may be partial), then dotted overrides."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist; pass the path to a YAML file "
                              f"(e.g. configs/quickstart.yaml)")
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise ConfigError(f"config file '{path}' is not valid YAML{at}: {problem}; fix the syntax there") from None
        if data is None:  # an empty file means "all defaults"
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must contain a mapping of sections "
                              f"(model, moe, router, parallel, data, train), got {type(data).__name__}; "
                              "write them as top-level keys, as in configs/quickstart.yaml")
        cfg = config_from_dict(data, origin=f"in {path}")
    return apply_overrides(cfg, list(overrides))


def help_text() -> str:
    """Every dotted key with its type, default and meaning, one per line."""
    width = max(len(k) for k in _LEAVES)
    lines = []
    for key, (tp, f) in _LEAVES.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{key:<{width}}  {_type_name(tp)} = {json.dumps(_plain(default))}  "
                     f"# {f.metadata.get('help', '')}")
    return "\n".join(lines)

"""Tensor names and layouts: Hugging Face per-expert tensors <-> our stacked expert tensors.

One `plan` (a list of entries built from our Config and a Family) drives both directions, so
import and export cannot drift apart:

    Same        one HF tensor is one of ours, unchanged       (attention, norms, router, embeddings)
    Experts     N (or 2N) HF [out, in] matrices are one stacked tensor of ours:
                  gate_up_proj[e] = cat(gate_e.T, up_e.T, dim=1)   [E, D, 2F]
                  down_proj[e]    = down_e.T                       [E, F, D]
    OursOnly    a tensor HF has no counterpart for (the aux-free routing bias, zero on import)

Transposes and concatenations move values without arithmetic, so a round trip is bit-exact.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .families import Family, HFConversionError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tensors some checkpoints carry that are recomputed at load time, never learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Same:
    ours: str
    hf: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Experts:
    ours: str
    hf: tuple[tuple[str, ...], ...]  # per expert: (gate, up) for "gate_up", (down,) for "down"
    kind: str  # "gate_up" | "down"
    shape: tuple[int, ...]  # ours: [E, D, 2F] or [E, F, D]

    @property
    def hf_shape(self) -> tuple[int, int]:
        experts, a, b = self.shape
        return (b // 2, a) if self.kind == "gate_up" else (b, a)


@dataclass(frozen=True)
class OursOnly:
    ours: str
    shape: tuple[int, ...]


Entry = Same | Experts | OursOnly


def plan(cfg, family: Family) -> list[Entry]:
    """Every tensor of our Transformer's state dict (ep=1), with its HF source."""
    m = cfg.model
    d, hd, v = m.d_model, m.effective_head_dim, m.vocab_size
    q_width, kv_width = m.n_heads * hd, m.n_kv_heads * hd
    entries: list[Entry] = [Same("embed.weight", "model.embed_tokens.weight", (v, d))]
    for i in range(m.n_layers):
        ours, hf = f"layers.{i}", f"model.layers.{i}"
        entries += [Same(f"{ours}.attn_norm.weight", f"{hf}.input_layernorm.weight", (d,))]
        for name, width in (("q_proj", q_width), ("k_proj", kv_width), ("v_proj", kv_width)):
            entries.append(Same(f"{ours}.attn.{name}.weight", f"{hf}.self_attn.{name}.weight", (width, d)))
            if m.qkv_bias:
                entries.append(Same(f"{ours}.attn.{name}.bias", f"{hf}.self_attn.{name}.bias", (width,)))
        entries.append(Same(f"{ours}.attn.o_proj.weight", f"{hf}.self_attn.o_proj.weight", (d, q_width)))
        if m.qk_norm:
            per_head = m.qk_norm_scope == "head"
            for name, width in (("q_norm", q_width), ("k_norm", kv_width)):
                entries.append(Same(f"{ours}.attn.{name}.weight", f"{hf}.self_attn.{name}.weight",
                                    (hd,) if per_head else (width,)))
        entries.append(Same(f"{ours}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", (d,)))
        if m.is_moe_layer(i):
            entries += _moe_entries(f"{ours}.ffn", f"{hf}.{family.moe_block}", cfg, family)
        else:
            entries += _swiglu_entries(f"{ours}.ffn", f"{hf}.mlp", d, m.dense_ffn_dim)
    entries.append(Same("norm.weight", "model.norm.weight", (d,)))
    if not m.tie_embeddings:
        entries.append(Same("lm_head.weight", "lm_head.weight", (v, d)))
    return entries


def _swiglu_entries(ours: str, hf: str, d: int, f: int) -> list[Entry]:
    return [Same(f"{ours}.gate_proj.weight", f"{hf}.gate_proj.weight", (f, d)),
            Same(f"{ours}.up_proj.weight", f"{hf}.up_proj.weight", (f, d)),
            Same(f"{ours}.down_proj.weight", f"{hf}.down_proj.weight", (d, f))]


def _moe_entries(ours: str, hf: str, cfg, family: Family) -> list[Entry]:
    moe, d = cfg.moe, cfg.model.d_model
    n, f = moe.num_experts, moe.expert_ffn_dim
    gate, up, down = family.expert_weights
    entries: list[Entry] = [
        Same(f"{ours}.router.weight", f"{hf}.gate.weight", (n, d)),
        OursOnly(f"{ours}.router.expert_bias", (n,)),
        Experts(f"{ours}.experts.gate_up_proj",
                tuple((f"{hf}.experts.{e}.{gate}.weight", f"{hf}.experts.{e}.{up}.weight") for e in range(n)),
                "gate_up", (n, d, 2 * f)),
        Experts(f"{ours}.experts.down_proj", tuple((f"{hf}.experts.{e}.{down}.weight",) for e in range(n)),
                "down", (n, f, d)),
    ]
    if moe.num_shared_experts:
        width = moe.effective_shared_expert_ffn_dim * moe.num_shared_experts
        entries += _swiglu_entries(f"{ours}.shared_experts", f"{hf}.shared_expert", d, width)
        if moe.shared_expert_gate:
            entries.append(Same(f"{ours}.shared_expert_gate.weight", f"{hf}.shared_expert_gate.weight", (1, d)))
    return entries


def hf_names(entries: Iterable[Entry]) -> list[str]:
    names = []
    for entry in entries:
        if isinstance(entry, Same):
            names.append(entry.hf)
        elif isinstance(entry, Experts):
            names += [name for per_expert in entry.hf for name in per_expert]
    return names


# ---- the two directions ---------------------------------------------------------------------

def to_gatepro(entries: list[Entry], read: Callable[[str, tuple[int, ...]], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fp32 state dict; `read(hf_name, expected_shape)` returns one HF tensor (shape checked)."""
    state = {}
    for entry in entries:
        if isinstance(entry, Same):
            state[entry.ours] = read(entry.hf, entry.shape).float()
        elif isinstance(entry, OursOnly):
            state[entry.ours] = torch.zeros(entry.shape)
        elif entry.kind == "gate_up":
            state[entry.ours] = torch.stack([
                torch.cat([read(g, entry.hf_shape).float().t(), read(u, entry.hf_shape).float().t()], dim=1)
                for g, u in entry.hf])
        else:
            state[entry.ours] = torch.stack([read(dn, entry.hf_shape).float().t() for (dn,) in entry.hf])
    return state


def to_hf(entries: list[Entry], state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF tensors (contiguous, `dtype`) from our global state dict."""
    out = {}
    for entry in entries:
        tensor = state[entry.ours]
        if isinstance(entry, OursOnly):
            if entry.ours.endswith("expert_bias") and bool(tensor.ne(0).any()):
                raise HFConversionError(
                    f"{entry.ours} is nonzero (router.bias.enabled): Hugging Face MoE routers have no routing "
                    "bias, so the exported model would route differently; export a run trained without it"
                )
            continue
        if isinstance(entry, Same):
            out[entry.hf] = tensor.to(dtype).contiguous()
            continue
        ffn = entry.shape[2] // 2
        for e, names in enumerate(entry.hf):
            if entry.kind == "gate_up":
                out[names[0]] = tensor[e, :, :ffn].t().to(dtype).contiguous()
                out[names[1]] = tensor[e, :, ffn:].t().to(dtype).contiguous()
            else:
                out[names[0]] = tensor[e].t().to(dtype).contiguous()
    return out


# ---- safetensors files ----------------------------------------------------------------------

class SafetensorsDir:
    """Lazy, shape-checked access to the tensors of a Hugging Face model directory."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file_of = _tensor_files(directory)
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self.file_of)

    def _slice(self, name: str):
        from safetensors import safe_open

        file = self.file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return self._handles[file].get_slice(name)

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.file_of:
            raise HFConversionError(
                f"tensor {name} is missing from {self.directory} ({len(set(self.file_of.values()))} safetensors "
                "file(s)); the checkpoint does not match its config.json"
            )
        tensor_slice = self._slice(name)
        actual = tuple(tensor_slice.get_shape())
        if actual != tuple(shape):
            raise HFConversionError(
                f"tensor {name} in {self.file_of[name]} has shape {list(actual)}, but config.json implies {list(shape)}"
            )
        return tensor_slice[:]

    def dtype_name(self) -> str:
        """The storage dtype of the first tensor: "float32", "bfloat16" or "float16"."""
        code = str(self._slice(next(iter(self.file_of))).get_dtype()).upper()
        return {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}.get(code, "float32")


def _tensor_files(directory: Path) -> dict[str, str]:
    """tensor name -> file name, from the index (sharded) or the single file."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise HFConversionError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from None
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise HFConversionError(f"{directory / file} (named in {INDEX}) does not exist; the download is incomplete")
        return dict(weight_map)
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in directory.glob("pytorch_model*.bin"))
        hint = (f"it holds {bins[0]}: re-save it with save_pretrained(..., safe_serialization=True)" if bins
                else "point at a Hugging Face model directory (config.json + *.safetensors)")
        raise HFConversionError(f"no *.safetensors weights in {directory}; {hint}")
    if len(files) > 1 and SINGLE not in files:
        raise HFConversionError(f"{directory} holds {len(files)} safetensors files but no {INDEX}; add the index file")
    from safetensors import safe_open

    file = SINGLE if SINGLE in files else files[0]
    with safe_open(str(directory / file), framework="pt") as handle:
        return {name: file for name in handle.keys()}


def check_no_strays(available: Iterable[str], expected: Iterable[str], tied: bool, where: Path, family: Family) -> None:
    """Every tensor in the checkpoint must be used: a stray one means config.json and weights disagree."""
    wanted = set(expected)
    for name in available:
        if name in wanted or name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            raise HFConversionError(
                f"tensor {name} in {where} is in the fused in-memory expert layout; re-save the model with "
                "transformers' save_pretrained, which writes one tensor per expert"
            )
        raise HFConversionError(
            f"tensor {name} in {where} is not part of a {family.model_type} model with this config.json; "
            "check num_hidden_layers / num_experts / mlp_only_layers"
        )


def parse_size(text: str) -> int:
    """'5GB', '200MB', '10KB' or a plain byte count."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    raw = text.strip().upper()
    for unit, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if raw.endswith(unit):
            try:
                return int(float(raw[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(raw)
    except ValueError:
        raise HFConversionError(f"max shard size '{text}' is not a size; write e.g. 5GB or 500MB") from None


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than one shard."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        save_file(shard, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + os.linesep)
    return names

"""Hugging Face model directory <-> gatepro_dist run directory.

Import (`import_hf`) writes a run directory that `gatepro-train OUT/config.yaml` continues from:

    OUT/config.yaml                        the run's config: model keys fixed by the checkpoint,
                                           train.run_dir=OUT, train.resume=auto, data.tokenizer set
    OUT/checkpoints/step_00000000/         a weights-only checkpoint (global expert tensors: loads
    OUT/checkpoints/latest                 at any ep and world size; fresh optimizer, step 0)
    OUT/hf/                                the model's own config.json, tokenizer and generation
                                           files, kept for export and for data.tokenizer

Export (`export_hf`) reads any checkpoint of such a run (or of any run, given --family) and writes
config.json + safetensors that `transformers` loads with `from_pretrained`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from ..config import Config, apply_overrides, config_from_dict, config_hash, flatten_keys, load_config
from ..config_checks import validate
from ..train.checkpoint import CHECKPOINTS, MANIFEST, latest_checkpoint, read_manifest, read_model_tensors, save_weights_only
from .families import HFConversionError, check_exportable, family_named, family_of, gatepro_keys_from_hf, \
    hf_config_from_gatepro
from .weights import SafetensorsDir, check_no_strays, hf_names, parse_size, plan, to_gatepro, to_hf, \
    write_safetensors

HF_FILES = "hf"  # OUT/hf: the imported model's own non-weight files
CONFIG_JSON = "config.json"
TOKENIZER_JSON = "tokenizer.json"
# Small files of a model directory worth carrying along (tokenizer, chat template, generation).
CARRIED_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
NOT_CARRIED = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Continued-training defaults, under the checkpoint's hints and any --config: the schema's defaults
# are for training from scratch (lr 3e-3 would wreck a pretrained model). The HF families were
# trained without a router z-loss, so it starts off (a config may turn it on).
CONTINUE_DEFAULTS = {"train.lr": 2e-5, "train.warmup_steps": 20, "train.min_lr_ratio": 0.1,
                     "router.z_loss_coef": 0.0}


@dataclass(frozen=True)
class Imported:
    run_dir: Path
    checkpoint: Path
    config_path: Path
    family: str
    config: Config


@dataclass(frozen=True)
class Exported:
    directory: Path
    family: str
    files: list[str]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise HFConversionError(f"{path} not found; {what}")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise HFConversionError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise HFConversionError(f"{path} must hold a JSON object")
    return data


def _with(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted keys set (type-checked by the schema)."""
    nested = cfg.to_dict()
    for key, value in values.items():
        *path, leaf = key.split(".")
        node = nested
        for part in path:
            node = node[part]
        node[leaf] = value
    return config_from_dict(nested, origin="converted")


def _get(cfg: Config, key: str) -> Any:
    return flatten_keys(cfg.to_dict())[key]


# ---- import ---------------------------------------------------------------------------------

def import_hf(hf_dir: str | Path, out_dir: str | Path, config_path: str | None = None,
              overrides: Sequence[str] = (), tokenizer: str | None = None) -> Imported:
    """Convert a local HF MoE checkpoint into a run directory (see the module docstring).

    Nothing is written until every check passed: config.json, tensors and shapes, tokenizer,
    and the resulting run config. ``tokenizer``: a tokenizer.json path, ``"none"`` for bytes, or
    None for ``hf_dir/tokenizer.json``.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).absolute()
    if not hf_dir.is_dir():
        raise HFConversionError(f"{hf_dir} is not a directory; pass a local Hugging Face model directory")
    hf_config = _read_json(hf_dir / CONFIG_JSON, "point at a Hugging Face model directory (config.json + *.safetensors)")
    family, forced, hints = gatepro_keys_from_hf(hf_config, str(hf_dir / CONFIG_JSON))
    tokenizer_path = _find_tokenizer(hf_dir, tokenizer, forced["model.vocab_size"])
    if (out_dir / CHECKPOINTS).exists():
        raise HFConversionError(f"{out_dir} already holds {CHECKPOINTS}/; convert into a new directory")

    cfg = _run_config(config_path, overrides, forced, hints, out_dir, tokenizer_path)
    weights = SafetensorsDir(hf_dir)
    entries = plan(cfg, family)
    check_no_strays(weights.names(), hf_names(entries), cfg.model.tie_embeddings, hf_dir, family)
    state = to_gatepro(entries, weights.read)

    carried = out_dir / HF_FILES
    carried.mkdir(parents=True, exist_ok=True)
    for file in sorted(hf_dir.iterdir()):
        if _carried(file):
            shutil.copyfile(file, carried / file.name)
    if tokenizer_path is not None:
        if Path(tokenizer_path).resolve() != (hf_dir / TOKENIZER_JSON).resolve():
            shutil.copyfile(tokenizer_path, carried / TOKENIZER_JSON)
        cfg = _with(cfg, {"data.tokenizer": str(carried / TOKENIZER_JSON)})
    source = {"hf_dir": str(hf_dir.absolute()), "family": family.model_type, "dtype": weights.dtype_name()}
    checkpoint = save_weights_only(out_dir, state, cfg.to_dict(), config_hash(cfg), source=source)
    config_file = out_dir / "config.yaml"
    header = (f"# Continue training {hf_dir.absolute()} ({family.model_type}) with gatepro_dist.\n"
              f"# Written by gatepro-convert hf-to-gp; model.* and moe.* are fixed by the checkpoint.\n")
    config_file.write_text(header + cfg.to_yaml())
    return Imported(out_dir, checkpoint, config_file, family.model_type, cfg)


def _carried(file: Path) -> bool:
    """A small non-weight file of a model directory (tokenizer, generation config, ...)."""
    return file.is_file() and file.name.endswith(CARRIED_SUFFIXES) and file.name not in NOT_CARRIED


def _find_tokenizer(hf_dir: Path, tokenizer: str | None, vocab_size: int) -> str | None:
    if tokenizer == "none":
        if vocab_size < 256:
            raise HFConversionError(f"--tokenizer none trains on bytes, but vocab_size={vocab_size} < 256")
        return None
    path = Path(tokenizer) if tokenizer else hf_dir / TOKENIZER_JSON
    if not path.is_file():
        raise HFConversionError(
            f"{path} not found; the model's tokenizer must be a tokenizer.json (pass --tokenizer PATH, "
            "or --tokenizer none to train on bytes)"
        )
    from ..data import DataError, load_text_tokenizer

    try:
        size = load_text_tokenizer(path).get_vocab_size(with_added_tokens=True)
    except DataError as err:
        raise HFConversionError(str(err)) from None
    if size > vocab_size:
        raise HFConversionError(f"tokenizer {path} has {size} tokens but the model's vocab_size is {vocab_size}")
    return str(path)


def _run_config(config_path: str | None, overrides: Sequence[str], forced: dict, hints: dict,
                out_dir: Path, tokenizer_path: str | None) -> Config:
    """defaults <- CONTINUE_DEFAULTS <- HF hints <- --config YAML <- values fixed by the checkpoint
    <- overrides."""
    cfg = load_config(config_path, [])
    user_keys = {}
    if config_path is not None:
        data = yaml.safe_load(Path(config_path).read_text())
        user_keys = flatten_keys(data) if isinstance(data, dict) else {}
    for key, value in forced.items():
        if key in user_keys and _get(cfg, key) != _get(_with(cfg, {key: value}), key):
            raise HFConversionError(
                f"{config_path} sets {key}={user_keys[key]!r}, but the checkpoint fixes it to {value!r}; "
                f"remove {key} from the config"
            )
    cfg = _with(cfg, {k: v for k, v in {**CONTINUE_DEFAULTS, **hints}.items() if k not in user_keys})
    cfg = _with(cfg, forced)
    seq_len = cfg.data.seq_len if "data.seq_len" in user_keys else min(cfg.data.seq_len, cfg.model.max_seq_len)
    cfg = _with(cfg, {"data.seq_len": seq_len, "data.tokenizer": tokenizer_path,
                      "train.run_dir": str(out_dir), "train.resume": "auto"})
    cfg = apply_overrides(cfg, list(overrides))
    for key, value in forced.items():
        if _get(cfg, key) != _get(_with(Config(), {key: value}), key):
            raise HFConversionError(
                f"override {key}={_get(cfg, key)!r} contradicts the checkpoint ({value!r}); drop it"
            )
    validate(cfg, world_size=cfg.parallel.ep)  # the smallest world the config can run at
    return cfg


# ---- export ---------------------------------------------------------------------------------

def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise HFConversionError(
            f"{path} is neither a checkpoint (no {MANIFEST}) nor a run directory with {CHECKPOINTS}/latest"
        )
    return latest


def export_hf(checkpoint: str | Path, out_dir: str | Path, family: str | None = None,
              hf_dir: str | Path | None = None, dtype: str = "auto", max_shard_size: str = "5GB") -> Exported:
    """Write a Hugging Face directory (config.json, safetensors, tokenizer files) for a checkpoint.

    The imported model's own config.json (``RUN/hf``, or ``hf_dir``) is the base of the new one,
    so keys we do not model (token ids, generation settings) survive the round trip.
    """
    checkpoint = resolve_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    cfg = config_from_dict(read_manifest(checkpoint)["config"], origin=f"{checkpoint / MANIFEST}")
    carried = Path(hf_dir) if hf_dir is not None else checkpoint.parent.parent / HF_FILES
    base = _read_json(carried / CONFIG_JSON, "") if (carried / CONFIG_JSON).is_file() else None
    if hf_dir is not None and base is None:
        raise HFConversionError(f"{carried / CONFIG_JSON} not found; --hf-config must name a directory with config.json")
    if family is None and base is None:
        raise HFConversionError(
            f"no {HF_FILES}/{CONFIG_JSON} beside {checkpoint}; pass --family (one of mixtral, olmoe, qwen2_moe, qwen3_moe)"
        )
    fam = family_named(family) if family is not None else family_of(base, str(carried / CONFIG_JSON))
    if base is not None and base.get("model_type") != fam.model_type:
        raise HFConversionError(f"--family {fam.model_type} but {carried / CONFIG_JSON} is a {base.get('model_type')} config")
    check_exportable(cfg, fam)
    if dtype == "auto":
        dtype = (base or {}).get("dtype") or (base or {}).get("torch_dtype") or "float32"
    if dtype not in DTYPES:
        raise HFConversionError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPES)} or auto")
    if (out_dir / CONFIG_JSON).exists():
        raise HFConversionError(f"{out_dir / CONFIG_JSON} already exists; export into a new directory")

    entries = plan(cfg, fam)
    state = read_model_tensors(checkpoint)
    for entry in entries:
        if entry.ours not in state:
            raise HFConversionError(f"tensor {entry.ours} is missing from checkpoint {checkpoint}")
        if tuple(state[entry.ours].shape) != entry.shape:
            raise HFConversionError(f"tensor {entry.ours} in {checkpoint} has shape {list(state[entry.ours].shape)}, "
                                    f"but its config implies {list(entry.shape)}")
    known = {entry.ours for entry in entries}
    stray = sorted(set(state) - known)
    if stray:
        raise HFConversionError(f"tensor {stray[0]} in {checkpoint} has no {fam.model_type} counterpart")
    tensors = to_hf(entries, state, DTYPES[dtype])

    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_safetensors(tensors, out_dir, parse_size(max_shard_size))
    if carried.is_dir():
        for file in sorted(carried.iterdir()):
            if _carried(file) and file.name != CONFIG_JSON:
                shutil.copyfile(file, out_dir / file.name)
                files.append(file.name)
    hf_config = hf_config_from_gatepro(cfg, fam, base, dtype)
    (out_dir / CONFIG_JSON).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return Exported(out_dir, fam.model_type, [CONFIG_JSON, *files])


__all__ = ["HFConversionError", "Imported", "Exported", "import_hf", "export_hf", "resolve_checkpoint"]

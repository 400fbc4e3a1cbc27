"""Hugging Face interop: continue training Mixtral, OLMoE and Qwen2/Qwen3-MoE checkpoints with GatePro.

    families.py   which HF families we read, and config.json <-> our Config
    weights.py    tensor names and layouts (per-expert HF matrices <-> our stacked experts), safetensors I/O
    convert.py    a HF model directory <-> a run directory with a weights-only checkpoint

`gatepro-convert` (gatepro_dist/cli/convert.py) is the command line; docs/hf.md the walkthrough.
Reading and writing needs `safetensors` and, for the tokenizer, `tokenizers`
(`pip install 'gatepro_dist[hf]'`); `transformers` is only needed to *use* an exported model.
"""
from .convert import Exported, Imported, export_hf, import_hf, resolve_checkpoint
from .families import FAMILIES, HFConversionError

__all__ = ["FAMILIES", "Exported", "HFConversionError", "Imported", "export_hf", "import_hf", "resolve_checkpoint"]

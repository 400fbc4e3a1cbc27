"""`gatepro-convert`: move MoE checkpoints between Hugging Face and gatepro_dist.

    gatepro-convert hf-to-gp HF_DIR OUT_DIR [--config YAML] [--tokenizer PATH|none] [key=value ...]
    gatepro-convert gp-to-hf CHECKPOINT_OR_RUN_DIR OUT_DIR [--family F] [--hf-config DIR]
                             [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB]
    gatepro-convert tokenize --tokenizer tokenizer.json --out corpus.bin SOURCE [SOURCE ...]

Everything is local: nothing is downloaded. A bad input exits with code 2 and one line that names
the file, key or tensor (see docs/hf.md).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

EXIT_BAD_INPUT = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatepro-convert",
        description="Convert Mixtral / OLMoE / Qwen2-MoE / Qwen3-MoE checkpoints between Hugging Face and "
                    "gatepro_dist (local files only). See docs/hf.md.")
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("hf-to-gp", help="a Hugging Face model directory -> a run directory to continue training")
    imp.add_argument("hf_dir", help="local directory with config.json, *.safetensors and tokenizer.json")
    imp.add_argument("out_dir", help="new run directory (config.yaml, checkpoints/, hf/)")
    imp.add_argument("--config", help="YAML with training settings (e.g. configs/continue_gatepro.yaml)")
    imp.add_argument("--tokenizer", help="tokenizer.json to use instead of HF_DIR/tokenizer.json; 'none' for bytes")
    imp.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, as for gatepro-train")

    exp = sub.add_parser("gp-to-hf", help="a checkpoint -> a Hugging Face directory for from_pretrained")
    exp.add_argument("checkpoint", help="checkpoint directory (step_XXXXXXXX) or a run directory (its latest)")
    exp.add_argument("out_dir", help="new Hugging Face model directory")
    exp.add_argument("--family", help="mixtral, olmoe, qwen2_moe or qwen3_moe (default: that of RUN/hf/config.json)")
    exp.add_argument("--hf-config", help="directory whose config.json (and tokenizer files) to start from "
                                         "(default: RUN/hf written by hf-to-gp)")
    exp.add_argument("--dtype", default="auto", help="auto (the imported model's dtype, else float32), float32, "
                                                     "bfloat16 or float16")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB (default)")

    tok = sub.add_parser("tokenize", help="encode text once into a .bin token file (data.source=...bin)")
    tok.add_argument("sources", nargs="+", help="text files or directories ('stdlib' for the built-in corpus)")
    tok.add_argument("--tokenizer", required=True, help="local tokenizer.json")
    tok.add_argument("--out", required=True, help="output .bin file")
    tok.add_argument("--max-bytes", type=int, default=1 << 30, help="read at most this many bytes of text")
    return parser


def fail(message: str) -> int:
    print(f"gatepro-convert: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra and args.command != "hf-to-gp":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..train.checkpoint import CheckpointError
    from ..config import ConfigError
    from ..train.data import DataError
    from ..hf import HFConversionError

    try:
        if args.command == "hf-to-gp":
            return _import(args, [*args.overrides, *extra])
        if args.command == "gp-to-hf":
            return _export(args)
        return _tokenize(args)
    except (HFConversionError, ConfigError, DataError, CheckpointError) as err:
        return fail(str(err))
    except ImportError as err:
        return fail(f"{err}; pip install 'gatepro_dist[hf]'")


def _import(args, overrides: list[str]) -> int:
    from ..hf import import_hf

    bad = [item for item in overrides if "=" not in item]
    if bad:
        return fail(f"'{bad[0]}' is not a key=value override")
    done = import_hf(args.hf_dir, args.out_dir, config_path=args.config, overrides=overrides,
                     tokenizer=args.tokenizer)
    print(f"gatepro-convert: {done.family} -> {done.checkpoint} (weights only)")
    print(f"gatepro-convert: continue with: gatepro-train {done.config_path}   "
          f"(or: torchrun --nproc-per-node N -m gatepro_dist.cli.train {done.config_path} parallel.ep=N)")
    return 0


def _export(args) -> int:
    from ..hf import export_hf

    done = export_hf(args.checkpoint, args.out_dir, family=args.family, hf_dir=args.hf_config,
                     dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"gatepro-convert: wrote {done.family} model to {done.directory} ({', '.join(done.files)})")
    return 0


def _tokenize(args) -> int:
    from ..train.data import load_text_tokenizer, load_tokens

    sources = args.sources[0] if args.sources == ["stdlib"] else args.sources
    stream = load_tokens(sources, max_bytes=args.max_bytes, tokenizer=args.tokenizer)
    vocab = load_text_tokenizer(args.tokenizer).get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "uint32"
    stream.slice(0, len(stream)).astype(dtype).tofile(args.out)
    print(f"gatepro-convert: {len(stream)} tokens -> {args.out}; train with "
          f"data.source={args.out} data.bin_dtype={dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

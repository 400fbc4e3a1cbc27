"""`gatepro-convert`: move MoE checkpoints between Hugging Face and gatepro_dist.

    gatepro-convert hf-to-gp HF_DIR OUT_DIR [--config YAML] [--tokenizer PATH|none] [key=value ...]
    gatepro-convert gp-to-hf CHECKPOINT_OR_RUN_DIR OUT_DIR [--family F] [--hf-config DIR]
                             [--dtype auto|float32|bfloat16|float16] [--max-shard-size 5GB]
    gatepro-convert tokenize --tokenizer tokenizer.json|bytes --out DIR [--workers N] [--max-tokens N]
                             [--shard-tokens N] [--eos-id N] [--text-key text] SOURCE [SOURCE ...]

Everything is local: nothing is downloaded. A bad input exits with code 2 and one line that names
the file, key or tensor (see docs/hf.md).
"""
from __future__ import annotations

import argparse
import sys

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

    tok = sub.add_parser("tokenize", help="encode a corpus once into token shards + manifest (data.source=DIR)")
    tok.add_argument("sources", nargs="+", help="text files, .jsonl(.gz) files, directories or globs ('stdlib' for "
                                                "the built-in corpus); each file, or each JSON line, is a document")
    tok.add_argument("--tokenizer", required=True, help="local tokenizer.json, or 'bytes' (ids 0-255, 256 ends a document)")
    tok.add_argument("--out", required=True, help="output directory (shards, documents.npy, manifest.json); a rerun "
                                                  "with the same settings continues it, skipping finished shards")
    tok.add_argument("--workers", type=int, default=1, help="encoding processes (default 1)")
    tok.add_argument("--shard-tokens", type=int, default=1 << 25, help="tokens per shard (default 33554432)")
    tok.add_argument("--eos-id", type=int, help="end-of-document id (default: the tokenizer's own)")
    tok.add_argument("--max-tokens", type=int, help="stop at the last document boundary within this many tokens")
    tok.add_argument("--text-key", default="text", help="the field of each JSON line that holds the text")
    tok.add_argument("--quiet", action="store_true", help="no progress line")
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
    from ..data import DataError
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
    import os

    from ..data.tokenize import describe, tokenize_corpus

    # --workers N means N encoding processes of one thread each (the Rust tokenizer would otherwise
    # spread every batch over all cores itself, and warn when the pool forks).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = tokenize_corpus(args.sources, args.tokenizer, args.out, workers=args.workers,
                             shard_tokens=args.shard_tokens, eos_id=args.eos_id, max_tokens=args.max_tokens,
                             text_key=args.text_key, progress=not args.quiet)
    for line in describe(result):
        print(f"gatepro-convert: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The data path, one idea per file:

- ``sources.py`` — how a corpus is found and memory-mapped (token shards, .npy, Megatron indexed
  datasets, tokenized directories with a manifest, text and JSON lines) -> ``TokenStream``;
- ``text.py`` — documents read from text / JSON lines and the tokenizers that encode them;
- ``tokenize.py`` — the offline tool behind ``gatepro-convert tokenize`` (streaming, workers, shards);
- ``mixing.py`` — which block comes next: block orders, the global-batch sampler, mixtures by weight;
- ``batch.py`` — the batch the model sees: inputs and targets, document positions and masks, prefetch;
- ``corpus.py`` — the train/validation views a run uses, built from the ``data`` config section.
"""
from .batch import BlockView, PrefetchingView, byte_unigram_entropy, document_layout, make_batch
from .corpus import DataSplit, MixtureVal, MixtureView, build_data, data_from_config, split_blocks
from .mixing import BlockOrder, GlobalBatchSampler, MixtureSampler
from .sources import BIN_DTYPES, DEFAULT_MAX_BYTES, TokenStream, load_tokens
from .text import (DEFAULT_SUFFIXES, FILE_SEPARATOR, DataError, encode_text, files_under, load_text_tokenizer,
                   looks_binary, stdlib_corpus_files)

__all__ = [
    "BIN_DTYPES", "DEFAULT_MAX_BYTES", "DEFAULT_SUFFIXES", "FILE_SEPARATOR", "BlockOrder", "BlockView", "DataError",
    "DataSplit", "GlobalBatchSampler", "MixtureSampler", "MixtureVal", "MixtureView", "PrefetchingView",
    "TokenStream", "build_data", "byte_unigram_entropy", "data_from_config", "document_layout", "encode_text",
    "files_under", "load_text_tokenizer", "load_tokens", "looks_binary", "make_batch", "split_blocks",
    "stdlib_corpus_files",
]

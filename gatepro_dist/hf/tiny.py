"""Tiny random Hugging Face MoE models and a tiny tokenizer, built locally (nothing downloaded).

The tests convert these, and docs/hf.md uses them so that every command there runs offline:

    python -m gatepro_dist.hf.tiny qwen3_moe /tmp/tiny-qwen3   # config.json, safetensors, tokenizer.json

Weights are drawn at a scale where routing is decisive and logits are O(1) (the families' own
0.02 init makes every model nearly constant, which would let a wrong conversion pass).
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

WORDS = ("the a cat dog bird sat ran flew on under over mat park tree red blue green big small quick slow "
         "jumps sleeps sings and or but today tomorrow here there").split()
VOCAB_SIZE = 96


def tiny_text(sentences: int = 400, seed: int = 0) -> str:
    """Deterministic sentences over WORDS: training text the tiny tokenizer covers."""
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + " ." for _ in range(sentences))


def tiny_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A BPE `tokenizers.Tokenizer` trained on tiny_text (at most vocab_size tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(tiny_text().splitlines(), trainer)
    return tokenizer


def tiny_config(family: str, **changes):
    """A few-layer, few-expert config of `family` (transformers config object)."""
    import transformers

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6, num_experts_per_tok=2, bos_token_id=1,
                  eos_token_id=2, pad_token_id=None)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_hidden_layers=2, num_local_experts=4, intermediate_size=24,
                                         rope_theta=1e6)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_hidden_layers=2, num_experts=8, intermediate_size=24,
                                       norm_topk_prob=False)
    elif family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**common, num_hidden_layers=3, num_experts=4, moe_intermediate_size=24,
                                          intermediate_size=40, shared_expert_intermediate_size=16,
                                          decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, num_hidden_layers=4, num_experts=4, moe_intermediate_size=24,
                                          intermediate_size=40, head_dim=16, decoder_sparse_step=2,
                                          norm_topk_prob=True, tie_word_embeddings=True)
    else:
        raise ValueError(f"no tiny config for {family!r}; choose mixtral, olmoe, qwen2_moe or qwen3_moe")
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights at a scale where attention, routing and experts all matter."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(0.5 + torch.rand(p.shape, generator=gen))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[-1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
    return model


def save_tiny_model(family: str, directory: str | Path, *, seed: int = 0, max_shard_size: str | None = None,
                    dtype: torch.dtype = torch.float32, **changes) -> Path:
    """Write a tiny random `family` model (config.json, safetensors, tokenizer.json) to `directory`."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    model = randomize(AutoModelForCausalLM.from_config(tiny_config(family, **changes)), seed).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    tiny_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m gatepro_dist.hf.tiny FAMILY OUT_DIR")
    print(save_tiny_model(sys.argv[1], sys.argv[2]))

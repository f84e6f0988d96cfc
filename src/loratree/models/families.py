"""Tiny random models of every popular decoder family, built from transformers' configs.

Each family is a few kilobytes of weights with the attention kind, norm, MLP and head tying
of its real checkpoints: grouped-query attention where the family has it, sliding windows
(short, so a test prompt reaches them) where it has them, multi-query attention for Falcon.
Tests run the same checks over all of them (the family matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

__all__ = ["EAGER", "FAMILIES", "SLIDING", "VOCAB", "WINDOW", "tiny_family"]

VOCAB = 64
WINDOW = 4
"""The sliding window of the tiny sliding-window families: shorter than any test prompt."""

_COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "tie_word_embeddings": False}


def _llama() -> PretrainedConfig:
    return LlamaConfig(**_COMMON)


def _qwen2() -> PretrainedConfig:
    return Qwen2Config(**_COMMON)


def _qwen3() -> PretrainedConfig:
    return Qwen3Config(**_COMMON, head_dim=8)


def _mistral() -> PretrainedConfig:
    return MistralConfig(**_COMMON, sliding_window=WINDOW)


def _gemma2() -> PretrainedConfig:
    common = {**_COMMON, "tie_word_embeddings": True}
    return Gemma2Config(**common, head_dim=8, sliding_window=WINDOW,
                        layer_types=["sliding_attention", "full_attention"])


def _gemma3() -> PretrainedConfig:
    common = {**_COMMON, "tie_word_embeddings": True, "num_hidden_layers": 3}
    return Gemma3TextConfig(**common, head_dim=8, sliding_window=WINDOW,
                            layer_types=["sliding_attention", "sliding_attention",
                                         "full_attention"])


def _phi3() -> PretrainedConfig:
    return Phi3Config(**_COMMON, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _gpt2() -> PretrainedConfig:
    return GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)


def _gpt_neox() -> PretrainedConfig:
    return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False)


def _falcon() -> PretrainedConfig:
    return FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, multi_query=True, new_decoder_architecture=False,
                        parallel_attn=True, bias=False, alibi=False)


FAMILIES: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "mistral": _mistral,
    "gemma2": _gemma2, "gemma3": _gemma3, "phi3": _phi3, "gpt2": _gpt2,
    "gpt_neox": _gpt_neox, "falcon": _falcon,
}
"""Family name -> its tiny config."""

EAGER = frozenset({"gemma2"})
"""Families transformers runs with eager attention only (no sdpa)."""

SLIDING = frozenset({"mistral", "gemma2", "gemma3"})
"""The families whose tiny models have sliding-window layers (window ``WINDOW``)."""


def tiny_family(name: str, seed: int = 0, attn: str | None = None) -> nn.Module:
    """A random model of family ``name`` (float32, eval mode), the same for the same seed;
    the caller's global RNG state is left as it was. ``attn``: the attention
    implementation (default: sdpa, or eager for the families that only have that)."""
    attn = attn or ("eager" if name in EAGER else "sdpa")
    try:
        config = FAMILIES[name]()
    except KeyError:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.generation_config.eos_token_id = None
    return model.float().eval()

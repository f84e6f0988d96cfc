"""Tiny random models built in code, for tests: deterministic per seed, milliseconds to run.

Each builder seeds torch inside a forked RNG, so the same seed gives the same weights and
building a model leaves the caller's global RNG state untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

__all__ = [
    "TinyConvNet",
    "random_tokens",
    "tiny_convnet",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_qwen3_moe",
    "tiny_tokenizer",
]


def tiny_llama(
    seed: int = 0,
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 64,
) -> LlamaForCausalLM:
    """A random Llama (float32, eval mode); ``kv_heads < heads`` gives grouped-query attention.

    Embeddings are untied, so ``embed_tokens`` and ``lm_head`` are separate targets.
    """
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def tiny_qwen3_moe(
    seed: int = 0,
    vocab: int = 128,
    hidden: int = 32,
    layers: int = 2,
    experts: int = 4,
    top_k: int = 2,
    expert_intermediate: int = 16,
) -> Qwen3MoeForCausalLM:
    """A random Qwen3-MoE (float32, eval mode): every layer's MLP is a sparse block whose
    experts are fused 3-D parameters, ``mlp.experts.gate_up_proj`` ``(E, 2 I, hidden)`` and
    ``mlp.experts.down_proj`` ``(E, hidden, I)``, routed by ``mlp.gate`` (a router module
    holding a 2-D ``weight`` ``(E, hidden)``, not an ``nn.Linear``)."""
    config = Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=expert_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        num_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3MoeForCausalLM(config)
        with torch.no_grad():  # the router starts at zero: give it weights that route
            for layer in model.model.layers:
                layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model.float().eval()


def tiny_gpt2(
    seed: int = 0, vocab: int = 128, n_embd: int = 32, n_layer: int = 2, n_head: int = 4
) -> GPT2LMHeadModel:
    """A random GPT-2 (float32, eval mode): ``c_attn``, ``c_proj``, ``c_fc`` are transformers'
    ``Conv1D`` (weight stored ``(in, out)``), and ``lm_head`` is tied to ``wte``."""
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab - 1,  # GPT-2's 50256 is outside a tiny vocabulary
        eos_token_id=vocab - 1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return model.float().eval()


class TinyConvNet(nn.Module):
    """A token model with every adaptable layer kind on its path (not a transformers model).

    ``embed`` (Embedding) -> ``conv1d`` over time -> ``conv2d`` over a ``(1, T)`` image with
    a non-square ``(1, 3)`` kernel -> ``proj`` (Linear) -> ``head`` (Linear) to logits. The
    convolutions are padded so the sequence length is kept.
    """

    def __init__(self, vocab: int = 128, channels: int = 16) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, channels)
        self.conv1d = nn.Conv1d(channels, channels, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(channels, channels, kernel_size=(1, 3), padding=(0, 1))
        self.proj = nn.Linear(channels, channels)
        self.head = nn.Linear(channels, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Integer ids ``(B, T)`` to logits ``(B, T, vocab)``."""
        x = self.embed(input_ids).transpose(1, 2)  # (B, C, T)
        x = torch.relu(self.conv1d(x)).unsqueeze(2)  # (B, C, 1, T)
        x = torch.relu(self.conv2d(x)).squeeze(2).transpose(1, 2)  # (B, T, C)
        return self.head(torch.relu(self.proj(x)))  # (B, T, vocab)


def tiny_convnet(seed: int = 0, vocab: int = 128, channels: int = 16) -> TinyConvNet:
    """A random :class:`TinyConvNet` (float32, eval mode)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyConvNet(vocab, channels)
    return model.eval()


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> Tensor:
    """Uniform random token ids ``(batch, seq)`` (int64) from a private generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def tiny_tokenizer(vocab: int = 128):
    """A word-level tokenizer for tiny models: ``"w5 w7"`` -> ``[5, 7]``, ids below ``vocab``.

    It has no chat template, so training uses loratree's built-in one; its role markers
    are added as special tokens (ids ``vocab - 3 .. vocab - 1``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab - 3)}}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<|system|>", "<|user|>", "<|assistant|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>",
    )

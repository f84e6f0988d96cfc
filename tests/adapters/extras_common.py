"""Shared by the PEFT-extras tests: tiny models, PEFT-made adapters, solo PEFT logits."""

from __future__ import annotations

import copy

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loratree import surgery
from loratree.adapters import load_adapter
from loratree.models.tiny import tiny_llama

VOCAB = 128
PLAIN = ({"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4},
         {"target_modules": ["o_proj", "down_proj"], "r": 3, "lora_alpha": 3},
         {"target_modules": ["q_proj", "gate_proj", "up_proj"], "r": 4, "lora_alpha": 8})
"""Plain LoRA adapters that share a mixed batch with the feature's adapter."""


def biased_llama(seed: int = 0) -> LlamaForCausalLM:
    """tiny_llama's shape with biases on attention and MLP projections (so a LoRA bias
    can be merged), random non-zero biases."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False,
                         attention_bias=True, mlp_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
    return model.float().eval()


def peft_made(base, path, seed: int, **fields):
    """A PEFT adapter on a copy of ``base`` with random non-zero weights (LoRA factors,
    LoRA biases, module copies, token rows), saved at ``path``; returns the PEFT model."""
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **fields)
    model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return model


def made_adapters(root, base, first: dict, plain: tuple[dict, ...], seed: int) -> list:
    """PEFT adapters written under ``root``: ``first`` in slot 0's file, then the plain
    ones; returns their paths in slot order."""
    paths = [root / "first"] + [root / f"plain{i}" for i in range(len(plain))]
    for i, (path, fields) in enumerate(zip(paths, (first, *plain), strict=True)):
        peft_made(base, path, seed=seed + i, **fields)
    return paths


def loaded(base, paths):
    """A copy of ``base`` with the adapters at ``paths`` loaded into slots 0, 1, ..."""
    model = copy.deepcopy(base)
    for i, path in enumerate(paths):
        assert load_adapter(model, path) == i
    return model


def solo(base, path, ids):
    """PEFT's logits for ``ids`` with the adapter at ``path`` alone (None: the base)."""
    model = copy.deepcopy(base)
    if path is not None:
        model = peft.PeftModel.from_pretrained(model, path).eval()
    with torch.no_grad():
        return model(ids).logits


def mixed(model, rows, ids, grad=False):
    """Our logits for ``ids`` with row i on slot ``rows[i]`` (one forward)."""
    ctx = surgery.context(model)
    with torch.set_grad_enabled(grad), ctx.use(torch.tensor(rows)):
        return model(ids).logits.detach()


LAYOUTS = {
    # (row slots, tokens per row): which strategy a LoRA layer takes
    "decode-gather": ([0, 1, 2, 3, -1], 1),
    "prefill-gather": ([3, 0, -1, 1, 2], 6),
    "sorted-view": ([0, 0, 1, 1, 2, 2, 3, 3], 5),
    "runs": ([0, 0, 0, 1, 1, 2, 3, -1], 12),
    "mixed": ([0, 1, 0, 2, 1, 3, 0, 2, 3, -1], 8),
}


def random_ids(rows: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


__all__ = ["LAYOUTS", "PLAIN", "VOCAB", "biased_llama", "mixed", "peft_made", "random_ids",
           "solo", "tiny_llama"]

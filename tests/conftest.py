"""Shared fixtures: tiny models built in code, and helpers to give adapters nonzero weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomize_slot(model: torch.nn.Module, slot: int, std: float = 0.1, seed: int = 1) -> None:
    """Give slot ``slot`` of every LoRA layer nonzero A and B (fresh B is zero)."""
    from loratree import surgery

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in surgery.lora_layers(model).values():
            for p in (layer.lora_a[slot], layer.lora_b[slot]):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_tiny_base(path, vocab: int = 64):
    """A tiny Llama and its word-level tokenizer saved as a model directory (what the CLI's
    ``--model`` takes); returns the path."""
    from loratree.models.tiny import tiny_llama, tiny_tokenizer

    tiny_llama(vocab=vocab).save_pretrained(path)
    tiny_tokenizer(vocab).save_pretrained(path)
    return path


def keep_logits(engine) -> dict:
    """Each request's logits, step by step, as the engine computed them (through the
    runner's ``on_logits`` test hook), keyed by handle; set before the requests run."""
    from collections import defaultdict

    kept: dict = defaultdict(list)
    engine.runner.on_logits = lambda handle, logits: kept[handle].append(logits.float().cpu())
    return kept


def rewrite_in_place(path, blobs, stop, *, mode: str = "wb", pause: float = 0.05) -> None:
    """Until ``stop`` is set, rewrite ``path`` with each of ``blobs`` in turn, in place and
    in 512-byte chunks (a reader can see any half-written state), pausing between rewrites."""
    import time

    k = 0
    while not stop.is_set():
        with open(path, mode) as f:
            data = blobs[k % 2]
            for i in range(0, len(data), 512):
                f.write(data[i:i + 512])
                f.flush()
                time.sleep(0.001)
        k += 1
        time.sleep(pause)

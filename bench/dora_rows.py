"""The cost of a DoRA row and of a ``modules_to_save`` row (a full ``lm_head`` copy) in a
mixed decode step: all-LoRA rows vs the same batch with row 0's adapter DoRA, and with
row 0's adapter carrying its own LM head, timed interleaved in one run (medians).

``python -m bench.dora_rows`` runs it on a tiny Llama (a quick check);
``python -m bench.dora_rows --smollm`` on the embedded SmolLM2-135M.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from loratree import surgery
from loratree.config import LoraConfig

__all__ = ["dora_step_times"]


def _adapters(model: nn.Module, n: int, rank: int) -> None:
    """Slots 0..n-1 plain LoRA, slot n DoRA, slot n + 1 plain LoRA with its own lm_head."""
    for i in range(n + 2):
        surgery.inject(model, LoraConfig(
            rank=rank, alpha=2 * rank, targets=("all-linear",), use_dora=i == n,
            modules_to_save=("lm_head",) if i == n + 1 else ()), trainable=False)
    with torch.no_grad():
        for layer in surgery.lora_layers(model).values():
            for k in range(n + 2):
                layer.lora_b[k].normal_(0, 0.01)


@torch.no_grad()
def dora_step_times(model: nn.Module, rows: int = 8, rank: int = 16, n_adapters: int = 4,
                    repeats: int = 30, vocab: int = 128) -> dict[str, float]:
    """Median seconds of one decode-sized forward (one token per row), ``rows`` rows over
    ``n_adapters`` LoRA slots, vs the same batch with row 0 on a DoRA slot, and with row 0
    on a slot with a full lm_head copy."""
    _adapters(model, n_adapters, rank)
    ctx = surgery.context(model)
    lora = torch.tensor([i % n_adapters for i in range(rows)])
    dora = lora.clone()
    dora[0] = n_adapters
    copy = lora.clone()
    copy[0] = n_adapters + 1
    ids = torch.randint(0, vocab, (rows, 1))
    times: dict[str, list[float]] = {"all-lora": [], "one-dora": [], "one-copy": []}
    for i in range(repeats + 3):  # interleaved; the first 3 of each warm up
        for name, index in (("all-lora", lora), ("one-dora", dora), ("one-copy", copy)):
            start = time.perf_counter()
            with ctx.use(index):
                model(ids)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    out = {k: statistics.median(v) for k, v in times.items()}
    out["dora-ratio"] = out["one-dora"] / out["all-lora"]
    out["copy-ratio"] = out["one-copy"] / out["all-lora"]
    return out


def main() -> None:
    import sys

    from loratree.models.tiny import tiny_llama

    if "--smollm" in sys.argv:
        from loratree.models import load_base

        model, what = load_base("embedded")[0].eval(), "SmolLM2-135M"
        vocab = model.config.vocab_size
    else:
        model, what, vocab = tiny_llama().eval(), "tiny Llama", 128
    result = dora_step_times(model, vocab=vocab)
    print({k: round(v * 1e3, 3) if "ratio" not in k else round(v, 3)
           for k, v in result.items()},
          f"(ms, {what}, 8 rows, 4 LoRA adapters r=16 all-linear)")


if __name__ == "__main__":
    main()

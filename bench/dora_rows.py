"""The cost of a DoRA row and of a ``modules_to_save`` row (a full ``lm_head`` copy) in a
mixed decode step: all-LoRA rows vs the same batch with row 0's adapter DoRA, and with
row 0's adapter carrying its own LM head, timed interleaved in one run (medians).

``make bench`` runs it as the ``dora`` group of ``bench.run`` (on SmolLM2-135M; alone:
``python -m bench.run --only dora [--quick]``). ``python -m bench.dora_rows`` prints the
figures for a tiny Llama (a quick check); ``--smollm`` for the embedded SmolLM2-135M.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from bench.harness import Timing, interleaved
from bench.report import Check, Row, Table
from loratree import surgery
from loratree.config import LoraConfig

__all__ = ["dora_step_times", "dora_tables"]

log = logging.getLogger("bench")

ROWS, RANK, ADAPTERS = 8, 16, 4
CONTENDERS = ("all-lora", "one-dora", "one-copy")


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


def _step(model: nn.Module, index: torch.Tensor, ids: torch.Tensor):
    ctx = surgery.context(model)

    def run() -> None:
        with torch.inference_mode(), ctx.use(index):
            model(input_ids=ids, use_cache=False)

    return run


def dora_step_times(model: nn.Module, rows: int = ROWS, rank: int = RANK,
                    n_adapters: int = ADAPTERS, repeats: int = 30) -> dict[str, Timing]:
    """Timings of one decode-sized forward (one token per row), ``rows`` rows over
    ``n_adapters`` LoRA slots ("all-lora"), vs the same batch with row 0 on a DoRA slot
    ("one-dora"), and with row 0 on a slot with a full lm_head copy ("one-copy"). Adds
    the slots to ``model``."""
    _adapters(model, n_adapters, rank)
    lora = torch.tensor([i % n_adapters for i in range(rows)])
    dora, copied = lora.clone(), lora.clone()
    dora[0], copied[0] = n_adapters, n_adapters + 1
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, 1), generator=torch.Generator().manual_seed(0))
    fns = {name: _step(model, index, ids)
           for name, index in zip(CONTENDERS, (lora, dora, copied), strict=True)}
    return interleaved(fns, repeats, warmup=3)


def dora_tables(base: nn.Module, repeats: int) -> tuple[list[Table], list[Check]]:
    """The ``dora`` group of ``bench.run``: the three decode steps side by side."""
    model = copy.deepcopy(base)
    log.info("dora rows: 3 contenders x %d rounds", repeats)
    t = dora_step_times(model, repeats=repeats)
    head = surgery.copy_layers(model)["lm_head"].nbytes(ADAPTERS + 1)
    lora = t["all-lora"].median
    rows = [
        Row(f"decode step, {ROWS} rows on {ADAPTERS} LoRA slots", lora, None, "ms"),
        Row("same, row 0 on a DoRA slot", t["one-dora"].median, lora, "ms"),
        Row("same, row 0 on a slot with its own lm_head", t["one-copy"].median, lora, "ms"),
        Row("lm_head copy per slot", head, None, "bytes"),
    ]
    notes = [f"One token per row, {ROWS} rows, adapters r={RANK} alpha={2 * RANK} on all "
             "linear layers, slot table style (frozen, B random with std 0.01); the three "
             "steps timed interleaved in the same rounds, medians. The ratio column is "
             "the step against the all-LoRA step.",
             *(f"{name}: {t[name].describe()}." for name in CONTENDERS)]
    table = Table("Mixed decode step: one DoRA or lm_head-copy row among LoRA rows", rows,
                  notes, peer_name="all-LoRA")
    return [table], []


def main() -> None:
    import sys

    from loratree.models.tiny import tiny_llama

    if "--smollm" in sys.argv:
        from loratree.models import load_base

        model, what = load_base("embedded")[0].eval(), "SmolLM2-135M"
    else:
        model, what = tiny_llama().eval(), "tiny Llama"
    result = dora_step_times(model)
    lora = result["all-lora"].median
    print({k: round(v.median * 1e3, 3) for k, v in result.items()},
          {f"{k}/all-lora": round(v.median / lora, 3) for k, v in result.items()},
          f"(ms, {what}, {ROWS} rows, {ADAPTERS} LoRA adapters r={RANK} all-linear)")


if __name__ == "__main__":
    main()

"""Prefix-tuning rows: size, training step and generation latency, ours against PEFT.

Both sides hold the same 20-token prefix (PEFT's ``prompt_embeddings`` copied into ours).
Training steps are batch 4 x 128 as every training row; generation is greedy, 32 new
tokens after a 32-token prompt, with the KV cache, batch 1 and batch 4. The model without
any adapter is timed in the same rounds, so "vs none" is the cost of the prefix itself.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

from bench.contenders import QV_R8, ours_model, random_ids
from bench.harness import interleaved
from bench.report import Check, Row, Table, fmt
from bench.train_rows import BATCH, SEQ, _batch, _memory, _step
from loratree import surgery
from loratree.adapters import save_adapter
from loratree.config import PrefixConfig

__all__ = ["PARAMS_TARGET", "VIRTUAL_TOKENS", "prefix_tables"]

log = logging.getLogger(__name__)

VIRTUAL_TOKENS = 20
PARAMS_TARGET = 0.005
"""Acceptance: prefix-tuning with 20 virtual tokens trains under 0.5% of SmolLM2."""
PROMPT, NEW = 32, 32


def prefix_tables(base: nn.Module, repeats: int, tmp: Path) -> tuple[list[Table], list[Check]]:
    """Size, step time and memory, and generation latency of a 20-token prefix."""
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS))
    vectors = theirs.prompt_encoder["default"].embedding.weight.detach().clone()
    ours = copy.deepcopy(base)
    slot = surgery.add_prefix(ours, PrefixConfig(n_virtual=VIRTUAL_TOKENS), vectors=vectors)
    lora = ours_model(base, QV_R8, seed=50)
    surgery.set_trainable(lora, 0)

    n_model = sum(p.numel() for p in base.parameters())
    mine = sum(p.numel() for p in surgery.adapter_parameters(ours, slot))
    peer = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    lora_params = sum(p.numel() for p in surgery.adapter_parameters(lora, 0))
    mine_file = _file_bytes(save_adapter(ours, tmp / "prefix-ours", slot))
    theirs.save_pretrained(tmp / "prefix-peft")
    peer_file = _file_bytes(tmp / "prefix-peft")

    batch = _batch(base)
    log.info("prefix train steps: 3 contenders x %d rounds", repeats)
    steps = interleaved({"ours": _step(ours, batch), "PEFT": _step(theirs, batch),
                         "LoRA": _step(lora, batch)}, repeats, warmup=1)
    memory = {"ours": _memory(ours, batch), "PEFT": _memory(theirs, batch)}
    for m in (ours, theirs):
        m.eval()
    generation = {}
    for b in (1, 4):
        ids = random_ids(base, b, PROMPT, seed=8)
        log.info("prefix generation, batch %d: 3 contenders x %d rounds", b, repeats)
        generation[b] = interleaved({"ours": _generate(ours, ids), "PEFT": _generate(theirs, ids),
                                     "none": _generate(base, ids)}, repeats, warmup=1)

    step = {k: t.median for k, t in steps.items()}
    rows = [
        Row("trainable parameters", mine, peer, "count"),
        Row("share of the model", mine / n_model, peer / n_model, "share"),
        Row("adapter file", mine_file, peer_file, "bytes"),
        Row("train step", step["ours"], step["PEFT"], "ms"),
        Row("train step / LoRA q,v r=8 step", step["ours"] / step["LoRA"],
            step["PEFT"] / step["LoRA"], "ratio"),
        Row("training memory", memory["ours"], memory["PEFT"], "bytes"),
    ]
    for b, t in generation.items():
        rows.append(Row(f"generate {NEW} tokens, batch {b}", t["ours"].median, t["PEFT"].median,
                        "ms"))
        rows.append(Row(f"  vs no adapter (batch {b})", t["ours"].median / t["none"].median,
                        t["PEFT"].median / t["none"].median, "ratio"))
    table = Table(
        f"Prefix-tuning, {VIRTUAL_TOKENS} virtual tokens (train batch {BATCH} x {SEQ})",
        rows,
        [f"LoRA q,v r=8 for scale: {lora_params:,} trainable parameters "
         f"({fmt(lora_params / n_model, 'share')} of the model), step "
         f"{fmt(step['LoRA'], 'ms')}.",
         f"Generation: greedy, {NEW} new tokens after a {PROMPT}-token prompt, KV cache on, "
         "the same prefix on both sides; 'vs no adapter' divides by the bare model's time "
         "in the same rounds."],
    )
    share = mine / n_model
    checks = [Check(f"prefix-tuning ({VIRTUAL_TOKENS} tokens) trains < "
                    f"{PARAMS_TARGET:.1%} of SmolLM2", f"{share:.3%}", share < PARAMS_TARGET)]
    return [table], checks


def _generate(model: nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    mask = torch.ones_like(ids)

    def run() -> object:
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                  min_new_tokens=NEW, do_sample=False,
                                  pad_token_id=0)

    return run


def _file_bytes(path: Path) -> int:
    return (Path(path) / "adapter_model.safetensors").stat().st_size

"""Training rows: step time and memory, ours vs PEFT, against full fine-tuning and the floor.

A step is forward, token loss, backward and an AdamW step, on batch 4 x 128 tokens. Both
sides compute the loss with the same function and hold the same LoRA weights. The floor
is the frozen model with one trainable vector added to the input embeddings: forward plus
backward through every activation, the least a LoRA step can cost.

Memory on CPU is counted, not sampled: the bytes autograd saves for backward (each storage
once, frozen weights excluded), plus gradients, optimizer state and trainable parameters.
On CUDA the peak allocated memory is reported instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn

from bench.contenders import ALL_R16, QV_R8, ours_model, peft_model, random_ids
from bench.harness import interleaved
from bench.report import Check, Row, Table, fmt
from loratree import surgery
from loratree.train.steps import loss_sum

__all__ = ["train_tables"]

log = logging.getLogger(__name__)

BATCH, SEQ = 4, 128


def train_tables(base: nn.Module, repeats: int) -> tuple[list[Table], list[Check]]:
    """Step time and memory for q,v r8 and all-linear r16 (ours, PEFT), full FT, floor."""
    batch = _batch(base)
    models: dict[str, nn.Module] = {}
    for i, spec in enumerate((QV_R8, ALL_R16)):
        ours = ours_model(base, spec, seed=20 + i)
        theirs = peft_model(base, spec, ours)
        surgery.set_trainable(ours, 0)
        models[f"ours {spec.label}"] = ours
        models[f"PEFT {spec.label}"] = theirs
    models["floor"] = _floor_model(base)
    steps = {name: _step(m, batch) for name, m in models.items()}
    log.info("train steps: %d contenders x %d rounds", len(steps), repeats)
    t = interleaved(steps, repeats, warmup=1)
    memory = {name: _memory(m, batch) for name, m in models.items()}
    floor = t["floor"].median

    full = copy.deepcopy(base)
    for p in full.parameters():
        p.requires_grad_(True)
    full_t = interleaved({"full": _step(full, batch)}, max(repeats // 3, 2), warmup=1)["full"]
    full_mem = _memory(full, batch)
    del full

    tables, checks = [], []
    for spec in (QV_R8, ALL_R16):
        mine, peer = t[f"ours {spec.label}"].median, t[f"PEFT {spec.label}"].median
        rows = [
            Row("train step", mine, peer, "ms"),
            Row("step / floor", mine / floor, peer / floor, "ratio"),
            Row(
                "training memory",
                memory[f"ours {spec.label}"],
                memory[f"PEFT {spec.label}"],
                "bytes",
            ),
        ]
        tables.append(
            Table(
                f"Training step, {spec.label} (batch {BATCH} x {SEQ})",
                rows,
                [
                    f"Floor (frozen model, trainable input-embedding offset): {fmt(floor, 'ms')}, "
                    f"memory {fmt(memory['floor'], 'bytes')}.",
                ],
            )
        )
        checks.append(
            Check(
                f"LoRA train step, {spec.label}: ours / PEFT <= 1.00",
                f"{mine / peer:.3f}",
                mine <= peer,
            )
        )
    tables.append(
        Table(
            f"Full fine-tuning step (batch {BATCH} x {SEQ})",
            [
                Row("train step", full_t.median, None, "ms"),
                Row("step / floor", full_t.median / floor, None, "ratio"),
                Row("training memory", full_mem, None, "bytes"),
            ],
            ["Every weight trainable, AdamW; the far corner of the rank plane."],
        )
    )
    return tables, checks


def _batch(base: nn.Module) -> dict[str, torch.Tensor]:
    ids = random_ids(base, BATCH, SEQ, seed=5)
    labels = ids.clone()
    labels[:, : SEQ // 2] = -100  # loss on the second half, as for a completion
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _floor_model(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    model.floor_offset = nn.Parameter(torch.zeros(embed.weight.shape[1]))
    embed.register_forward_hook(lambda module, args, out: out + model.floor_offset)
    return model


def _step(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    n = int((batch["labels"][:, 1:] != -100).sum())

    def run() -> None:
        (loss_sum(model, batch, "fp32") / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run.optimizer = opt  # type: ignore[attr-defined]
    return run


def _memory(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Bytes a training step holds beyond the frozen weights (see the module docstring)."""
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        torch.cuda.reset_peak_memory_stats()
        _step(model, batch)()
        return float(torch.cuda.max_memory_allocated())
    frozen = {p.data_ptr() for p in model.parameters() if not p.requires_grad}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    step = _step(model, batch)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    trainable = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trainable)
    opt_bytes = sum(
        t.numel() * t.element_size()
        for state in step.optimizer.state.values()  # type: ignore[attr-defined]
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    return float(sum(seen.values()) + 2 * param_bytes + opt_bytes)  # params + their grads

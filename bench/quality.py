"""The quality table: base, LoRA over the rank plane, and full fine-tuning, on the demo tasks.

Every run gets the same data (the seeded demo tasks), the same step budget and batch, and
is scored on the same held-out rows: exact match of greedy answers, and eval loss.
One base model stays in memory; each LoRA run is unloaded before the next, and full
fine-tuning trains a deep copy.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bench.report import human_bytes
from loratree import surgery
from loratree.demo.run import PREFIX_LR
from loratree.demo.tasks import TASKS, write_tasks
from loratree.train import TrainConfig, fit, save, setup
from loratree.train.data import read_jsonl
from loratree.train.evaluate import eval_loss, exact_match

__all__ = ["QLORA", "QualityRow", "qlora_gaps", "quality_markdown", "quality_rows"]

log = logging.getLogger(__name__)

PLANE = [(f"LoRA r={r} {name}", r, targets)
         for name, targets in (("q,v", ("q_proj", "v_proj")), ("all-linear", ("all-linear",)))
         for r in (1, 4, 8, 16)]
LORA_LR, FULL_LR = 1e-3, 5e-5
QLORA = "QLoRA r=8 all-linear (NF4 base)"
PREFIX = "prefix-tuning, 20 virtual tokens"


@dataclass(frozen=True)
class QualityRow:
    task: str
    method: str
    exact_match: float
    eval_loss: float
    trainable: int
    adapter_bytes: int | None
    seconds: float


def quality_rows(base: nn.Module, tokenizer, *, steps: int, n_train: int = 400,
                 n_eval: int = 50, tasks: tuple[str, ...] = tuple(TASKS)) -> list[QualityRow]:
    """Train and score every method on every task."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="loratree-quality-") as tmp:
        data = write_tasks(Path(tmp) / "data", n_train, n_eval, names=tasks)
        for task in tasks:
            train_path, eval_path = data[task]
            held_out = read_jsonl(eval_path).rows
            rows.append(_score(task, "base", base, tokenizer, train_path, eval_path, held_out,
                               0, None, 0.0))
            for label, rank, targets in PLANE:
                rows.append(_train_and_score(task, label, base, tokenizer, train_path,
                                             eval_path, held_out, steps, Path(tmp),
                                             rank=rank, targets=targets))
            qlora = copy.deepcopy(base)  # quantized in place by setup; the float base stays
            rows.append(_train_and_score(task, QLORA, qlora, tokenizer, train_path,
                                         eval_path, held_out, steps, Path(tmp), rank=8,
                                         targets=("all-linear",), quantize="nf4"))
            del qlora
            rows.append(_train_and_score(task, PREFIX, base, tokenizer, train_path, eval_path,
                                         held_out, steps, Path(tmp), method="prefix",
                                         virtual_tokens=20, lr=PREFIX_LR))
            full = copy.deepcopy(base)
            rows.append(_train_and_score(task, "full fine-tuning", full, tokenizer, train_path,
                                         eval_path, held_out, steps, Path(tmp), method="full"))
            del full
    return rows


def _config(train_path: Path, eval_path: Path, out: Path, steps: int, **kw) -> TrainConfig:
    rank = kw.get("rank", 8)
    return TrainConfig(
        data=str(train_path), eval_data=str(eval_path), out=str(out), max_steps=steps,
        warmup_steps=max(steps // 10, 1), batch_size=8, max_length=96, eval_every=steps,
        save_every=steps, keep_last=1, eval_examples=0, alpha=2.0 * rank,
        **{"lr": FULL_LR if kw.get("method") == "full" else LORA_LR, **kw},
    )


def _train_and_score(task, label, model, tokenizer, train_path, eval_path, held_out, steps,
                     tmp: Path, **kw) -> QualityRow:
    started = time.perf_counter()
    out = tmp / task / label.replace(" ", "_").replace(",", "")
    run = setup(_config(train_path, eval_path, out, steps, **kw), model=model,
                tokenizer=tokenizer)
    fit(run, progress=False)
    save(run)
    trainable = sum(p.numel() for p in run.params.values())
    size = (out / "adapter_model.safetensors").stat().st_size if kw.get("method") != "full" \
        else None  # LoRA and prefix adapters are files; full fine-tuning is a model
    row = _score(task, label, model, tokenizer, train_path, eval_path, held_out, trainable,
                 size, time.perf_counter() - started)
    if kw.get("method") != "full":
        surgery.unload(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return row


def _score(task, label, model, tokenizer, train_path, eval_path, held_out, trainable, size,
           seconds) -> QualityRow:
    from loratree.models.chat import encode
    from loratree.train.data import pad_token_id

    em, _ = exact_match(model, tokenizer, held_out, max_new_tokens=24)
    examples = encode(held_out, tokenizer, 96).examples
    loss = eval_loss(model, examples, batch_size=8, pad_id=pad_token_id(tokenizer),
                     device=next(model.parameters()).device)
    log.info("%s / %s: EM %.0f%%, eval loss %.3f", task, label, 100 * em, loss)
    return QualityRow(task, label, em, loss, trainable, size, seconds)


def quality_markdown(rows: list[QualityRow], steps: int) -> tuple[list[str], dict[str, float]]:
    """Markdown lines of the table, and per task the EM ratio LoRA r8 all-linear / full FT."""
    lines = [
        "## Quality on the demo tasks (SmolLM2, same data and step budget)", "",
        f"{steps} steps of batch 8 per run; LoRA lr {LORA_LR}, prefix-tuning lr {PREFIX_LR}, "
        f"full fine-tuning lr {FULL_LR}; "
        "alpha = 2 r; held-out exact match of greedy answers and eval loss on the same rows.",
        "", "| task | method | held-out EM | eval loss | trainable params | adapter file | "
        "train+eval time |", "|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios = {}
    for r in rows:
        size = human_bytes(r.adapter_bytes) if r.adapter_bytes else "—"
        lines.append(f"| {r.task} | {r.method} | {100 * r.exact_match:.0f}% | "
                     f"{r.eval_loss:.3f} | {r.trainable:,} | {size} | {r.seconds:.0f} s |")
    for task in dict.fromkeys(r.task for r in rows):
        em = {r.method: r.exact_match for r in rows if r.task == task}
        full = em.get("full fine-tuning", 0.0)
        ratios[task] = em.get("LoRA r=8 all-linear", 0.0) / full if full else float("inf")
    return lines, ratios


def qlora_gaps(rows: list[QualityRow]) -> dict[str, float]:
    """Per task, QLoRA's held-out EM minus LoRA's (r=8 all-linear, float base), in points."""
    gaps = {}
    for task in dict.fromkeys(r.task for r in rows):
        em = {r.method: r.exact_match for r in rows if r.task == task}
        if QLORA in em and "LoRA r=8 all-linear" in em:
            gaps[task] = 100 * (em[QLORA] - em["LoRA r=8 all-linear"])
    return gaps

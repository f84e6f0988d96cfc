"""Running a sweep, read top-down: full fine-tuning, the fused LoRA pass, step timing, report.

``run_sweep(config)`` loads the base once and then:

1. Full fine-tuning (when ``config.full``) trains a deep copy of the base through
   ``loratree.train.train`` at ``full_lr``; the base itself stays untouched.
2. Every (target set, rank) point is one job of the fused multi-job trainer
   (``loratree.train.many``): one process, one frozen base, one forward and backward per
   step over every job's rows, each job its own slot, optimizer and schedule. Each job
   equals the same job trained alone to float rounding, so the grid costs one pass.
   Each job is scored by the trainer at its last step (eval loss, and exact match of
   greedy answers on the first ``eval_examples`` held-out rows).
3. Step time. A fused step serves every job at once, so it says nothing about one
   configuration; each configuration is therefore timed alone afterwards: the adapter is
   put on the bare base (the trained full model, for full fine-tuning), one warm-up
   optimizer step is taken, then ``timing_steps`` more, and the table shows their median
   wall time. They are the solo trainer's steps (``loratree.train.steps.optimizer_step``:
   forward, loss, backward, clip, AdamW) on the first batches of the run's data order.
4. The table, JSON, CSV and plot (``loratree.sweep.report``).

Trainable parameters are counted from the model: the job's adapter parameters, or every
parameter for full fine-tuning. Adapter bytes are the size of the saved
``adapter_model.safetensors`` (for full fine-tuning, of the saved model's safetensors).
Each run keeps its adapter (or model), ``metrics.jsonl`` and ``loss.png`` under
``out/runs/<point>``; its checkpoints are removed (a sweep does not resume). One process
only (no torchrun).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from loratree import surgery
from loratree.errors import NonFiniteError, TargetError
from loratree.models import load_base
from loratree.models.chat import Encoded, encode
from loratree.sweep.grid import SweepConfig, slug
from loratree.sweep.report import FULL, SweepResult, SweepRow, recommend, write_reports
from loratree.train import TrainConfig, distributed, train
from loratree.train.checkpoint import Position
from loratree.train.data import pad_token_id, read_jsonl
from loratree.train.loop import next_batch
from loratree.train.many import ManyConfig, fit_many, setup_many
from loratree.train.steps import adamw, label_tokens, optimizer_step

__all__ = ["point_config", "points", "run_sweep", "time_steps"]

logger = logging.getLogger(__name__)


def points(config: SweepConfig) -> list[tuple[str, str, tuple[str, ...], int]]:
    """(job name, target-set name, patterns, rank) of every grid point, sets first."""
    return [(f"{name} r={rank}", name, patterns, rank)
            for name, patterns in config.target_sets for rank in config.ranks]


def point_config(config: SweepConfig, out: str | Path, *, rank: int | None = None,
                 targets: tuple[str, ...] = ("all-linear",)) -> TrainConfig:
    """The ``TrainConfig`` of one point (``rank=None``: full fine-tuning)."""
    full = rank is None
    return TrainConfig(
        data=config.data, eval_data=config.eval_data, out=str(out), model=config.model,
        method="full" if full else "lora", rank=rank or 8,
        alpha=config.alpha(rank or 8), targets=targets, max_length=config.max_length,
        batch_size=config.batch_size, lr=config.full_lr if full else config.lr,
        warmup_steps=config.warmup_steps, max_steps=config.steps, seed=config.seed,
        eval_every=config.steps, save_every=config.steps, keep_last=1,
        eval_examples=config.eval_examples, max_new_tokens=config.max_new_tokens)


def run_sweep(config: SweepConfig, *, model: nn.Module | None = None,
              tokenizer: object | None = None, progress: bool = True) -> SweepResult:
    """Train and score every point (and full fine-tuning), write the reports, and return
    the rows with the recommendation. ``model`` / ``tokenizer`` replace loading
    ``config.model``; the model is left bare (its adapters unloaded) afterwards."""
    if model is None:
        model, tokenizer = load_base(config.model)
    if tokenizer is None:
        raise ValueError("a sweep needs a tokenizer; the model directory has none")
    for name, patterns in config.target_sets:  # before any training, not after full FT
        try:
            surgery.find_targets(model, patterns)
        except TargetError as e:
            raise TargetError(f"target set {name!r}: {e}") from None
    model_params = sum(p.numel() for p in model.parameters())
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    full_rows = []
    if config.full:
        full_rows.append(_full(config, model, tokenizer, progress))
        seconds["full"] = time.perf_counter() - started
    t = time.perf_counter()
    lora_rows = _fused(config, model, tokenizer, progress)
    seconds["lora"] = time.perf_counter() - t
    t = time.perf_counter()
    lora_rows = _timed(config, model, tokenizer, lora_rows, progress)
    seconds["timing"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    rows = tuple(lora_rows + full_rows)
    result = SweepResult(config, rows, recommend(rows, config.tolerance), model_params,
                         seconds)
    write_reports(result, config.out)
    return result


def _full(config: SweepConfig, base: nn.Module, tokenizer: object,
          progress: bool) -> SweepRow:
    """Full fine-tuning of a deep copy of the base, scored and timed."""
    out = Path(config.out) / "runs" / "full"
    c = point_config(config, out)
    model = copy.deepcopy(base)
    try:
        result = train(c, progress=progress, model=model, tokenizer=tokenizer)
    except NonFiniteError as e:
        logger.error("full fine-tuning stopped: %s", e)
        return SweepRow(FULL, FULL, None, sum(p.numel() for p in model.parameters()), None,
                        None, None, None, str(out), error=str(e))
    _drop_checkpoints(out)
    params = [p for p in model.parameters() if p.requires_grad]
    data = encode(read_jsonl(c.data), tokenizer, c.max_length)
    step = time_steps(model, params, data, c, config.timing_steps, pad_token_id(tokenizer))
    size = sum(f.stat().st_size for f in (out / "model").glob("*.safetensors"))
    return SweepRow(FULL, FULL, None, sum(p.numel() for p in params), size or None,
                    result.eval.get("eval_loss"), result.eval.get("exact_match"), step,
                    str(out))


def _fused(config: SweepConfig, model: nn.Module, tokenizer: object,
           progress: bool) -> list[SweepRow]:
    """Every grid point as one job of one fused run; a row per job (no step time yet)."""
    grid = points(config)
    runs = Path(config.out) / "runs"
    jobs = tuple(point_config(config, runs / f"{slug(s)}-r{r}", rank=r, targets=patterns)
                 for _, s, patterns, r in grid)
    many = ManyConfig(tuple(name for name, *_ in grid), jobs, config.rows_per_pass)
    run = setup_many(many, model=model, tokenizer=tokenizer)
    try:
        result = fit_many(run, progress=progress)
    finally:
        distributed.shutdown(run.dist)
    rows = []
    for job, (name, set_name, _, rank) in zip(run.jobs, grid, strict=True):
        evals, error = result.evals.get(name, {}), result.errors.get(name)
        file = job.out / "adapter_model.safetensors"
        _drop_checkpoints(job.out)
        rows.append(SweepRow(name, set_name, rank, sum(p.numel() for p in job.params.values()),
                             file.stat().st_size if error is None and file.is_file() else None,
                             evals.get("eval_loss"), evals.get("exact_match"), None,
                             str(job.out), error))
    return rows


def _timed(config: SweepConfig, model: nn.Module, tokenizer: object, rows: list[SweepRow],
           progress: bool) -> list[SweepRow]:
    """``rows`` with each LoRA point's solo step time, its adapter alone on the bare base."""
    surgery.unload(model)
    data = encode(read_jsonl(config.data), tokenizer, config.max_length)
    pad = pad_token_id(tokenizer)
    timed = []
    grid = {name: (patterns, rank) for name, _, patterns, rank in points(config)}
    for row in tqdm(rows, desc="step time", unit="config", disable=not progress):
        patterns, rank = grid[row.name]
        c = point_config(config, row.out, rank=rank, targets=patterns)
        report = surgery.inject(model, c.lora())
        params = list(surgery.adapter_parameters(model, report.slot))
        try:
            step = time_steps(model, params, data, c, config.timing_steps, pad)
        except NonFiniteError as e:
            logger.warning("%s: step timing stopped: %s", row.name, e)
            step = None
        finally:
            surgery.unload(model)
        timed.append(dataclasses.replace(row, step_seconds=step))
    for p in model.parameters():
        p.requires_grad_(False)
    return timed


def time_steps(model: nn.Module, params: list[nn.Parameter], data: Encoded, c: TrainConfig,
               n: int, pad_id: int) -> float:
    """Median wall seconds of ``n`` optimizer steps of ``params`` (after one warm-up step),
    as the solo trainer takes them, on the first batches of ``c``'s data order."""
    device = next(model.parameters()).device
    optimizer = adamw(params, c.lr, c.weight_decay)
    was_training = model.training
    model.train()
    position, times = Position(0, 0, 0), []
    for i in range(n + 1):
        position, examples = next_batch(data, c, position)
        _sync(device)
        t0 = time.perf_counter()
        optimizer_step(model, examples, step=i + 1, total_tokens=label_tokens(examples),
                       world=1, grad_accum=1, pad_id=pad_id, device=device,
                       precision=c.precision, params=params, optimizer=optimizer,
                       clip_norm=c.clip_norm)
        _sync(device)
        if i:  # the first step is the warm-up (allocations, AdamW state)
            times.append(time.perf_counter() - t0)
        position = Position(position.step + 1, position.epoch, position.batch + 1)
    model.train(was_training)
    return statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop_checkpoints(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)

"""Training, read top-down: ``setup`` builds a run, ``fit`` trains it, ``save`` writes it.

``train(config)`` is all three. A run trains one adapter in slot 0 (LoRA, or with
``method="prefix"`` a prefix) or, with ``method="full"``, every weight. It is
deterministic for a seed, checkpoints atomically every ``save_every`` steps and on
SIGTERM/SIGINT, resumes exactly, and stops with an error naming the step if the loss or a
gradient goes non-finite. Under ``torchrun`` each process takes every world-th example of
each batch and rank 0 alone writes files. With ``grow`` (one process, LoRA) the rank
doubles whenever the eval loss stalls, and training stops early when growing stops
helping (``train/grow.py``).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from loratree import surgery, tree
from loratree.adapters import AdapterStore, read_adapter, save_adapter
from loratree.adapters.card_files import card_fields, write_card
from loratree.adapters.files import load_adapter_file
from loratree.adapters.node_files import write_record
from loratree.models import load_base, save_model
from loratree.models.chat import Encoded, encode
from loratree.train import checkpoint as ckpt
from loratree.train import distributed
from loratree.train.centroid import save_centroid
from loratree.train.config import TrainConfig
from loratree.train.data import RowSet, batch_order, from_records, pad_token_id, read_jsonl
from loratree.train.evaluate import eval_loss, exact_match
from loratree.train.grow import Grower
from loratree.train.metrics import MetricsLog, read_metrics
from loratree.train.steps import adamw, label_tokens, optimizer_step

__all__ = ["Run", "TrainResult", "catch_signals", "fit", "lr_schedule", "next_batch", "save",
           "setup", "train"]

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything ``fit`` needs, built by ``setup``."""

    config: TrainConfig
    model: nn.Module
    tokenizer: object
    train_data: Encoded
    eval_rows: RowSet | None
    eval_data: Encoded | None
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    dist: distributed.Dist
    out: Path
    metrics: MetricsLog
    stop_signal: list[int] = field(default_factory=list)
    grow: Grower | None = None
    """The rank-growth policy, when ``config.grow``."""

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


@dataclass(frozen=True)
class TrainResult:
    steps: int
    train_loss: float
    eval: dict[str, float]
    out: Path
    interrupted: bool = False
    ranks: tuple[int, ...] = ()
    """With ``grow``: the start rank, then each grown rank."""
    stopped_early: bool = False
    """With ``grow``: training stopped before ``max_steps`` because growing stopped helping
    (or would pass ``grow_max_rank``)."""
    eval_seconds: float = 0.0
    """Wall time spent in held-out evaluation."""


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True,
          model: nn.Module | None = None, tokenizer: object | None = None,
          rows: Iterable[Mapping] | RowSet | None = None,
          eval_rows: Iterable[Mapping] | RowSet | None = None) -> TrainResult:
    """Set up, fit and save one run.

    ``rows`` / ``eval_rows`` take records in place of ``config.data`` / ``config.eval_data``:
    a Hugging Face ``datasets`` object or any iterable of {"prompt", "completion"} or
    {"messages"} dicts.
    """
    run = setup(config, model=model, tokenizer=tokenizer, rows=rows, eval_rows=eval_rows)
    try:
        result = fit(run, resume=resume, progress=progress)
        if not result.interrupted:
            save(run)
        return result
    finally:
        distributed.shutdown(run.dist)


def setup(config: TrainConfig, *, model: nn.Module | None = None,
          tokenizer: object | None = None, rows: Iterable[Mapping] | RowSet | None = None,
          eval_rows: Iterable[Mapping] | RowSet | None = None) -> Run:
    """Load the base and data, add the adapter, and build the optimizer and schedule."""
    d = distributed.init(config.device)
    if config.grow and d.world > 1:
        raise ValueError(f"grow runs in one process (the rank changes mid-run, which DDP "
                         f"cannot follow); this is process {d.rank} of {d.world}")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if model is None:
        model, tokenizer = load_base(config.model)
    if tokenizer is None:
        raise ValueError("training needs a tokenizer; the model directory has none")
    rows = _rows(rows, config.data, config.skip_bad_rows)
    if rows is None:
        raise ValueError("no training data: give data (a JSONL file) or rows")
    train_data = encode(rows, tokenizer, config.max_length)
    eval_rows = _rows(eval_rows, config.eval_data, config.skip_bad_rows)
    eval_data = encode(eval_rows, tokenizer, config.max_length) if eval_rows else None
    if config.grow and eval_data is None:
        raise ValueError("grow decides on the eval loss: give eval_data (a JSONL file) or "
                         "eval_rows")
    if config.quantize == "nf4":
        surgery.quantize(model)  # logs its report
    if config.method == "lora":
        report = surgery.inject(model, config.lora())
        logger.info("%s", report)
        if config.parent is not None:
            _stack_on_parent(model, config)
    elif config.method == "prefix":
        slot = surgery.add_prefix(model, config.prefix())
        n = sum(p.numel() for p in surgery.adapter_parameters(model, slot))
        total = sum(p.numel() for p in model.parameters())
        logger.info("slot %d: prefix of %d virtual tokens; trainable %s of %s parameters "
                    "(%.3f%%)", slot, config.virtual_tokens, f"{n:,}", f"{total:,}",
                    100 * n / total)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(d.device).train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = adamw(params.values(), config.lr, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    out = Path(config.out)
    return Run(config, model, tokenizer, train_data, eval_rows, eval_data, params, optimizer,
               scheduler, d, out, MetricsLog(out / "metrics.jsonl", enabled=d.main),
               grow=Grower.from_config(config) if config.grow else None)


def fit(run: Run, *, resume: bool = False, progress: bool = True,
        on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train to ``max_steps``, evaluating and checkpointing on the way.

    ``on_step(step, loss)`` is called after each step is logged and checkpointed.
    """
    c, d = run.config, run.dist
    position = _resume(run) if resume else ckpt.Position(0, 0, 0)
    module = _maybe_ddp(run)
    pad = pad_token_id(run.tokenizer)
    restore = catch_signals(run.stop_signal)
    bar = tqdm(total=c.max_steps, initial=position.step, disable=not (progress and d.main),
               desc="train", unit="step")
    loss, started, tokens_done, evals, eval_s = math.nan, time.perf_counter(), 0, {}, 0.0
    try:
        while position.step < c.max_steps and not _stopped(run):
            position, examples = next_batch(run.train_data, run.config, position)
            total_tokens = label_tokens(examples)
            mine = examples[d.rank :: d.world]
            local = optimizer_step(
                module, mine, step=position.step + 1, total_tokens=total_tokens, world=d.world,
                grad_accum=c.grad_accum, pad_id=pad, device=d.device, precision=c.precision,
                params=list(run.params.values()), optimizer=run.optimizer, clip_norm=c.clip_norm,
            )
            run.scheduler.step()
            loss = d.all_sum(local) / max(total_tokens, 1)
            position = ckpt.Position(position.step + 1, position.epoch, position.batch + 1)
            tokens_done += sum(len(e) for e in examples)
            rate = tokens_done / max(time.perf_counter() - started, 1e-9)
            run.metrics.write(step=position.step, loss=loss, lr=run.scheduler.get_last_lr()[0],
                              tokens_per_s=rate)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            last = position.step == c.max_steps
            if run.eval_data is not None and (position.step % c.eval_every == 0 or last):
                t0 = time.perf_counter()
                evals = evaluate(run, position.step)
                eval_s += time.perf_counter() - t0
                if run.grow is not None and not last:
                    last = run.grow.after_eval(evals["eval_loss"], position.step, run.model,
                                               run.optimizer, run.metrics)
            saved = position.step % c.save_every == 0 or last
            if saved:
                _checkpoint(run, position)
            if on_step is not None:
                on_step(position.step, loss)
            if run.stop_signal and not last:
                if not saved:
                    _checkpoint(run, position)
                logger.warning("signal %d: checkpointed at step %d; resume with --resume",
                               run.stop_signal[0], position.step)
                return _result(run, position, loss, {}, eval_s, interrupted=True)
    finally:
        bar.close()
        restore()
    return _result(run, position, loss, evals, eval_s)


def _resume(run: Run) -> ckpt.Position:
    """Load the latest checkpoint into the run, if any; where training goes on from."""
    latest = ckpt.latest_checkpoint(run.checkpoints)
    if latest is None:
        return ckpt.Position(0, 0, 0)
    if run.grow is not None:  # regrow to the checkpoint's rank so its tensors fit
        run.grow.resume(ckpt.read_extra(latest).get("grow"), run.model)
    position = ckpt.load_checkpoint(latest, run.params, run.optimizer, run.scheduler)
    run.metrics.truncate_after(position.step)
    logger.info("resumed from %s at step %d", latest.name, position.step)
    return position


def _stopped(run: Run) -> bool:
    return run.grow is not None and bool(run.grow.stopped)


def _result(run: Run, position: ckpt.Position, loss: float, evals: dict[str, float],
            eval_s: float, interrupted: bool = False) -> TrainResult:
    ranks = tuple(run.grow.ranks) if run.grow is not None else ()
    return TrainResult(position.step, loss, evals, run.out, interrupted, ranks, _stopped(run),
                       eval_s)


def evaluate(run: Run, step: int | None) -> dict[str, float]:
    """Eval loss and (when ``eval_examples`` > 0) exact match on the held-out rows."""
    if not run.dist.main or run.eval_data is None:
        return {}
    c = run.config
    model = run.model
    result = {"eval_loss": eval_loss(model, run.eval_data.examples, batch_size=c.batch_size,
                                     pad_id=pad_token_id(run.tokenizer), device=run.dist.device,
                                     precision=c.precision)}
    if c.eval_examples and run.eval_rows is not None:
        rows = run.eval_rows.rows[: c.eval_examples]
        result["exact_match"], _ = exact_match(model, run.tokenizer, rows,
                                               max_new_tokens=c.max_new_tokens,
                                               device=run.dist.device)
    if step is not None:
        run.metrics.write(step=step, **result)
    return result


def save(run: Run) -> Path:
    """Write the trained adapter (PEFT format) into ``out``, or the full model into
    ``out/model``, and the loss plot; rank 0 only."""
    if not run.dist.main:
        return run.out
    if run.config.method != "full":
        save_adapter(run.model, run.out, 0, base_model=run.config.model)
        save_centroid(run.model, run.out, run.train_data.examples)
        card = card_fields(run.config.display_name, run.config.description)
        if card:
            write_card(run.out, card)
        _save_node(run)
    else:
        save_model(run.model, run.tokenizer, run.out / "model")
    from loratree.plots import plot_losses

    plot_losses(read_metrics(run.metrics.path), run.out / "loss.png")
    return run.out


def _rows(given: Iterable[Mapping] | RowSet | None, path: str | None,
          skip_bad_rows: bool) -> RowSet | None:
    if given is not None:
        return given if isinstance(given, RowSet) else from_records(
            given, skip_bad_rows=skip_bad_rows)
    return read_jsonl(path, skip_bad_rows=skip_bad_rows) if path else None


def next_batch(data: Encoded, c: TrainConfig,
               position: ckpt.Position) -> tuple[ckpt.Position, list]:
    """The examples of the batch at ``position`` in ``data``'s order for config ``c`` (the
    next epoch's first batch when this epoch is done), and the position it is at."""
    order = batch_order(len(data), c.batch_size, seed=c.seed, epoch=position.epoch,
                        group_by_length=c.group_by_length, lengths=data.lengths)
    if position.batch >= len(order):
        position = ckpt.Position(position.step, position.epoch + 1, 0)
        order = batch_order(len(data), c.batch_size, seed=c.seed, epoch=position.epoch,
                            group_by_length=c.group_by_length, lengths=data.lengths)
    return position, [data.examples[i] for i in order[position.batch]]


def _checkpoint(run: Run, position: ckpt.Position) -> None:
    if not run.dist.main:
        return
    write = ((lambda p: save_adapter(run.model, p, 0, base_model=run.config.model))
             if run.config.method != "full" else None)
    extra = {"grow": run.grow.state_dict()} if run.grow is not None else None
    ckpt.save_checkpoint(run.checkpoints, position, dict(run.params), run.optimizer,
                         run.scheduler, keep_last=run.config.keep_last, write_adapter=write,
                         extra=extra)


def lr_schedule(c: TrainConfig):
    """Linear warmup, then cosine decay to 0 at ``max_steps``; with ``grow``, constant after
    warmup (a growing run ends when growth stops helping, not at a known step, and rank
    added late must still get a learning rate to train with)."""
    def lr_factor(step: int) -> float:
        if step < c.warmup_steps:
            return (step + 1) / c.warmup_steps
        if c.grow:
            return 1.0
        progress = (step - c.warmup_steps) / max(c.max_steps - c.warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return lr_factor


def _maybe_ddp(run: Run) -> nn.Module:
    if run.dist.world == 1:
        return run.model
    ids = [run.dist.device.index] if run.dist.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(run.model, device_ids=ids)


def catch_signals(flag: list[int]):
    """On SIGTERM/SIGINT, note the signal; the loop checkpoints after the current step."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, frame: flag.append(signum))

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return restore


def _stack_on_parent(model: nn.Module, config: TrainConfig) -> None:
    """Load the parent's whole path (composed, frozen) into a slot that runs under slot 0,
    so the new adapter learns on top of it."""
    store = AdapterStore(config.store)
    path = tree.lineage(store, config.parent)
    composed = tree.compose_files([read_adapter(v) for _, v, _ in path], config.parent)
    under = load_adapter_file(model, composed, config.parent, trainable=False)
    surgery.stack(model, 0, under)
    surgery.set_trainable(model, 0)
    logger.info("training on top of %s (path of %d adapter(s), rank %d)", config.parent,
                len(path), max(a.shape[0] for a, _ in composed.weights.values()))


def _save_node(run: Run) -> None:
    """``tree.json`` beside a child's adapter (its parent and the parent path it was
    trained on), and the adapter into the store when ``node`` names it."""
    c = run.config
    store = AdapterStore(c.store) if (c.parent or c.node) else None
    if c.parent is not None:
        evals = [r for r in read_metrics(run.metrics.path) if "eval_loss" in r] \
            if run.metrics.path.exists() else []
        metrics = {k: float(evals[-1][k]) for k in ("eval_loss", "exact_match")
                   if evals and k in evals[-1]}
        write_record(run.out, tree.record_for(store, c.parent, base_model=c.model,
                                                   metrics=metrics))
    if c.node is not None:
        info = store.add(c.node, run.out)
        logger.info("added %s to the store %s", info.name, store.root)

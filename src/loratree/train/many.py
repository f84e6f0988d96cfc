"""Many LoRA jobs in one process on one frozen base, fused into one batch per step.

Each job is a ``TrainConfig`` of its own (data, eval data, rank, alpha, targets, lr,
schedule, steps, output) and owns one adapter slot. A step takes each active job's next
batch (its own data order, as a solo run would), stacks the rows of every job into one
batch, and runs one forward and one backward pass: every row goes through its own job's
slot (``SlotContext`` per-row index), so the frozen base runs once over all of them.

Nothing couples the jobs. The loss is normalised per job (its summed token loss over its
own labelled tokens), and the objective is the sum of the jobs' losses: the gradient
reaching a job's parameters is exactly its solo gradient. Clipping, AdamW state and the
LR schedule are per job. A job whose loss or gradient turns non-finite is stopped with an
error naming the step and its parameters are left as they were; the others go on. A job
that reaches its ``max_steps`` leaves the batch, is saved, and the rest continue.

Checkpoints, resume and SIGTERM work per job, in each job's own ``out/checkpoints``. Under
``torchrun`` each process takes every world-th row of each job's batch, and the jobs'
gradients are summed over processes (no DDP wrapper, so a stopped job's silence is fine).

With ``dropout`` > 0 the fused run draws its dropout masks from one stream, so it equals
solo runs in distribution rather than bit for bit; with no dropout it equals them to
floating-point rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from loratree import surgery
from loratree.adapters import save_adapter
from loratree.adapters.card_files import card_fields, write_card
from loratree.errors import NonFiniteError
from loratree.models import load_base
from loratree.models.chat import Encoded, encode
from loratree.train import checkpoint as ckpt
from loratree.train import distributed
from loratree.train.centroid import Features, save_centroid
from loratree.train.config import TrainConfig
from loratree.train.data import RowSet, collate, pad_token_id, read_jsonl
from loratree.train.loop import catch_signals, lr_schedule, next_batch
from loratree.train.many_eval import evaluate_job, evaluate_jobs
from loratree.train.metrics import MetricsLog, read_metrics
from loratree.train.passes import passes
from loratree.train.steps import adamw, label_tokens, token_losses

__all__ = [
    "Job",
    "ManyConfig",
    "ManyResult",
    "ManyRun",
    "evaluate_job",
    "evaluate_jobs",
    "fit_many",
    "save_job",
    "setup_many",
    "summary",
    "train_many",
]

logger = logging.getLogger(__name__)

_SHARED = ("model", "quantize", "precision", "device")
"""Settings every job of a fused run must agree on (one base, one forward)."""


@dataclass(frozen=True)
class ManyConfig:
    """Named jobs; ``names[i]`` trains ``jobs[i]``."""

    names: tuple[str, ...]
    jobs: tuple[TrainConfig, ...]
    rows_per_pass: int = 0
    """At most this many rows per forward/backward pass of a fused step (gradients
    accumulate over the passes). 0 (the default): the largest job's rows in this process,
    so a pass holds the activations of one solo step and the fused run's peak memory stays
    that of one job. More rows per pass run more jobs in each batched matmul (a GPU gains;
    on a CPU the matmuls already run at full speed with one job's rows) and take more
    memory. A pass also ends where jobs' row lengths differ much (``passes``)."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.rows_per_pass, int) or self.rows_per_pass < 0:
            problems.append(f"rows_per_pass must be an int >= 0, got {self.rows_per_pass!r}")
        if not self.jobs:
            problems.append("no jobs")
        if len(set(self.names)) != len(self.names):
            problems.append(f"job names repeat: {list(self.names)}")
        if len({j.out for j in self.jobs}) != len(self.jobs):
            problems.append("two jobs write to the same out directory")
        for name, job in zip(self.names, self.jobs, strict=True):
            problems += _job_problems(name, job)
        for key in _SHARED:
            values = {getattr(j, key) for j in self.jobs}
            if len(values) > 1:
                problems.append(f"every job must use the same {key}, got "
                                f"{sorted(map(str, values))}")
        if problems:
            raise ValueError("invalid jobs: " + "; ".join(problems))

    @classmethod
    def from_toml(cls, path: str | Path) -> ManyConfig:
        """``[defaults]`` (any ``TrainConfig`` settings) and one ``[[job]]`` table per job,
        each with a ``name`` and its own settings over the defaults."""
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        unknown = sorted(set(raw) - {"defaults", "job", "fused"})
        if unknown:
            raise ValueError(f"{path}: unknown table(s) {unknown}; use [defaults], [[job]] "
                             "and [fused]")
        fused = dict(raw.get("fused", {}))
        rows_per_pass = fused.pop("rows_per_pass", 0)
        if fused:
            raise ValueError(f"{path}: [fused] takes rows_per_pass only, got {sorted(fused)}")
        defaults, tables = raw.get("defaults", {}), raw.get("job", [])
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        names, jobs = [], []
        for i, table in enumerate(tables):
            table = dict(table)
            name = str(table.pop("name", f"job{i}"))
            bad = sorted((set(defaults) | set(table)) - known)
            if bad:
                raise ValueError(f"{path}: job {name!r}: unknown setting(s) {bad}")
            names.append(name)
            jobs.append(TrainConfig(**{**defaults, **table}))
        return cls(tuple(names), tuple(jobs), rows_per_pass)



def _job_problems(name: str, job: TrainConfig) -> list[str]:
    """What a job may not ask for in a fused run."""
    problems = []
    if job.method != "lora":
        problems.append(f"job {name!r}: method must be 'lora', got {job.method!r}")
    if job.grad_accum != 1:
        problems.append(f"job {name!r}: grad_accum must be 1 in a fused run")
    if job.grow:
        problems.append(f"job {name!r}: grow (a rank that changes mid-run) runs solo, "
                        "not fused")
    if job.parent is not None:
        problems.append(f"job {name!r}: a tree node (parent) trains solo, not fused")
    return problems

@dataclass
class Job:
    """One job's state inside a fused run."""

    name: str
    config: TrainConfig
    slot: int
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_data: Encoded
    eval_rows: RowSet | None
    eval_data: Encoded | None
    metrics: MetricsLog
    position: ckpt.Position = field(default_factory=lambda: ckpt.Position(0, 0, 0))
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    evals: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    @property
    def active(self) -> bool:
        return self.error is None and self.position.step < self.config.max_steps


@dataclass
class ManyRun:
    config: ManyConfig
    model: nn.Module
    tokenizer: object
    jobs: list[Job]
    dist: distributed.Dist
    stop_signal: list[int] = field(default_factory=list)
    eval_seconds: float = 0.0
    features: Features = field(default_factory=dict)
    """Base-model features of routing prompts, shared by jobs on the same data."""


@dataclass(frozen=True)
class ManyResult:
    """Per job: the steps done, its last loss, its eval figures, and its error if it was
    stopped."""

    steps: dict[str, int]
    losses: dict[str, list[float]]
    evals: dict[str, dict[str, float]]
    errors: dict[str, str]
    seconds: float
    interrupted: bool = False
    eval_seconds: float = 0.0
    """Wall time spent in held-out evaluation (jobs due together evaluate together)."""


def train_many(config: ManyConfig, *, resume: bool = False, progress: bool = True,
               model: nn.Module | None = None, tokenizer: object | None = None) -> ManyResult:
    """Set up, fit and save every job."""
    run = setup_many(config, model=model, tokenizer=tokenizer)
    try:
        return fit_many(run, resume=resume, progress=progress)
    finally:
        distributed.shutdown(run.dist)


def setup_many(config: ManyConfig, *, model: nn.Module | None = None,
               tokenizer: object | None = None) -> ManyRun:
    """Load the base once and give every job its slot, optimizer and schedule."""
    first = config.jobs[0]
    d = distributed.init(first.device)
    if model is None:
        model, tokenizer = load_base(first.model)
    if tokenizer is None:
        raise ValueError("training needs a tokenizer; the model directory has none")
    if first.quantize == "nf4":
        surgery.quantize(model)
    # every slot first: injecting a slot freezes every other parameter (as a solo run
    # wants), so the jobs' parameters are collected and unfrozen once all slots exist
    slots = [_add_slot(model, tokenizer, name, c) for name, c in
             zip(config.names, config.jobs, strict=True)]
    jobs = [_job(model, name, c, slot, data, d) for (name, c), (slot, data) in
            zip(zip(config.names, config.jobs, strict=True), slots, strict=True)]
    model.to(d.device).train()
    return ManyRun(config, model, tokenizer, jobs, d)


def _add_slot(model: nn.Module, tokenizer: object, name: str, c: TrainConfig
              ) -> tuple[int, tuple[Encoded, RowSet | None, Encoded | None]]:
    random.seed(c.seed)
    torch.manual_seed(c.seed)  # the job's initial A is the one its solo run would draw
    train_data = encode(read_jsonl(c.data, skip_bad_rows=c.skip_bad_rows), tokenizer,
                        c.max_length)
    eval_rows = read_jsonl(c.eval_data, skip_bad_rows=c.skip_bad_rows) if c.eval_data else None
    eval_data = encode(eval_rows, tokenizer, c.max_length) if eval_rows else None
    report = surgery.inject(model, c.lora())
    logger.info("job %s: %s", name, report)
    return report.slot, (train_data, eval_rows, eval_data)


def _job(model: nn.Module, name: str, c: TrainConfig, slot: int,
         data: tuple[Encoded, RowSet | None, Encoded | None], d: distributed.Dist) -> Job:
    mine = {id(p) for p in surgery.adapter_parameters(model, slot)}
    params = {n: p.requires_grad_(True) for n, p in model.named_parameters() if id(p) in mine}
    optimizer = adamw(params.values(), c.lr, c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(c))
    return Job(name, c, slot, params, optimizer, scheduler, *data,
               MetricsLog(Path(c.out) / "metrics.jsonl", enabled=d.main))


def fit_many(run: ManyRun, *, resume: bool = False, progress: bool = True,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> ManyResult:
    """Train every job to its ``max_steps`` (or its error), one fused batch per step.

    ``on_step(step, losses)`` is called after each fused step with the losses of the jobs
    that took part.
    """
    if resume:
        for job in run.jobs:
            _resume(job)
    pad = pad_token_id(run.tokenizer)
    restore = catch_signals(run.stop_signal)
    bars = [tqdm(total=j.config.max_steps, initial=j.position.step, position=i, desc=j.name,
                 unit="step", disable=not (progress and run.dist.main), leave=True)
            for i, j in enumerate(run.jobs)]
    started = time.perf_counter()
    step = 0
    try:
        while active := [j for j in run.jobs if j.active]:
            step += 1
            losses = _fused_step(run, active, pad)
            due = [job for job, bar in zip(run.jobs, bars, strict=True)
                   if job in active and _after_step(run, job, losses.get(job.name), bar)]
            if due:
                t0 = time.perf_counter()
                evaluate_jobs(run, due)
                run.eval_seconds += time.perf_counter() - t0
            for job in active:
                if losses.get(job.name) is not None:
                    _save_due(run, job)
            if on_step is not None:
                on_step(step, {k: v for k, v in losses.items() if v is not None})
            if run.stop_signal and any(j.active for j in run.jobs):
                for job in run.jobs:
                    if job.active:
                        _checkpoint(run, job)
                logger.warning("signal %d: every job checkpointed; resume with --resume",
                               run.stop_signal[0])
                return _result(run, started, interrupted=True)
    finally:
        for bar in bars:
            bar.close()
        restore()
    return _result(run, started)


def _fused_step(run: ManyRun, jobs: Sequence[Job], pad: int) -> dict[str, float | None]:
    """Forward and backward over every job's batch (in passes of ``rows_per_pass`` rows,
    gradients accumulating); then each job's own check, clip and optimizer step. Returns
    each job's loss (None for a job stopped here)."""
    d, model = run.dist, run.model
    parts = []
    for job in jobs:
        job.position, examples = next_batch(job.train_data, job.config, job.position)
        parts.append((job, label_tokens(examples), examples[d.rank :: d.world]))
    tokens = {job.name: max(n, 1) for job, n, _ in parts}
    sums = dict.fromkeys(tokens, 0.0)
    width = run.config.rows_per_pass or max(len(mine) for _, _, mine in parts)
    for chunk in passes([(job, mine) for job, _, mine in parts], width):
        batch = {k: v.to(d.device) for k, v in collate([e for _, e in chunk], pad).items()}
        slots = torch.tensor([job.slot for job, _ in chunk], device=d.device)
        with surgery.context(model).use(slots):
            row_loss = _row_losses(model, batch, jobs[0].config.precision)  # (B,)
        objective = []
        for job in {id(j): j for j, _ in chunk}.values():
            s = row_loss[[i for i, (j, _) in enumerate(chunk) if j is job]].sum()
            sums[job.name] += float(s.detach())
            if math.isfinite(float(s.detach())):  # a non-finite job is stopped below; keep it out
                objective.append(s / tokens[job.name])
        if objective:
            torch.stack(objective).sum().backward()
    totals = _all_sum(d, torch.tensor([sums[job.name] for job, _, _ in parts],
                                      dtype=torch.float64, device=d.device))
    losses: dict[str, float | None] = {}
    for (job, _, _), total in zip(parts, totals.tolist(), strict=True):
        if not math.isfinite(total):
            _stop(job, f"step {job.position.step + 1}: the loss is not finite ({total})")
            losses[job.name] = None
        elif _apply(job, d):
            losses[job.name] = total / tokens[job.name]
        else:
            losses[job.name] = None
    return losses


def _row_losses(model: nn.Module, batch: dict[str, Tensor], precision: str) -> Tensor:
    """Each row's summed next-token cross-entropy over its labelled tokens (fp32)."""
    return token_losses(model, batch, precision).sum(dim=1)


def _apply(job: Job, d: distributed.Dist) -> bool:
    """Sum the job's gradient over processes, check and clip it, and step; False (and the
    job stopped, its parameters unchanged) if it is not finite."""
    grads = [p for p in job.params.values() if p.grad is not None]
    if d.world > 1:
        for p in grads:
            torch_dist.all_reduce(p.grad)
    if job.config.clip_norm > 0:
        norm = float(torch.nn.utils.clip_grad_norm_(grads, job.config.clip_norm))
    else:
        norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads])))
    if not math.isfinite(norm):
        job.optimizer.zero_grad(set_to_none=True)
        _stop(job, f"step {job.position.step + 1}: a gradient is not finite (norm {norm})")
        return False
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    job.scheduler.step()
    return True


def _stop(job: Job, why: str) -> None:
    job.error = str(NonFiniteError(f"job {job.name!r}: {why}; it is stopped, the other jobs "
                                   "go on"))
    for p in job.params.values():
        p.grad = None
    logger.error("%s", job.error)


def _after_step(run: ManyRun, job: Job, loss: float | None, bar: tqdm) -> bool:
    """Record the job's step; True when its evaluation is due now."""
    if loss is None:
        bar.set_postfix_str("stopped: non-finite")
        return False
    job.position = ckpt.Position(job.position.step + 1, job.position.epoch,
                                 job.position.batch + 1)
    job.losses.append(loss)
    job.metrics.write(step=job.position.step, loss=loss, lr=job.scheduler.get_last_lr()[0])
    bar.set_postfix(loss=f"{loss:.4f}")
    bar.update(1)
    c, step = job.config, job.position.step
    return job.eval_data is not None and (step % c.eval_every == 0 or step == c.max_steps)


def _save_due(run: ManyRun, job: Job) -> None:
    c, step = job.config, job.position.step
    if step % c.save_every == 0 or step == c.max_steps:
        _checkpoint(run, job)
    if step == c.max_steps:
        save_job(run, job)


def save_job(run: ManyRun, job: Job) -> Path:
    """The job's adapter (PEFT format, its slot), routing centroid (as ``train`` writes
    it; jobs on the same prompts share the base's features), card (``display_name``,
    ``description``) and loss plot."""
    if not run.dist.main:
        return job.out
    save_adapter(run.model, job.out, job.slot, base_model=job.config.model)
    save_centroid(run.model, job.out, job.train_data.examples, run.features)
    card = card_fields(job.config.display_name, job.config.description)
    if card:
        write_card(job.out, card)
    from loratree.plots import plot_losses

    plot_losses(read_metrics(job.metrics.path), job.out / "loss.png")
    return job.out


def _resume(job: Job) -> None:
    latest = ckpt.latest_checkpoint(job.out / "checkpoints")
    if latest is None:
        return
    job.position = ckpt.load_checkpoint(latest, job.params, job.optimizer, job.scheduler)
    job.metrics.truncate_after(job.position.step)
    job.losses = [r["loss"] for r in read_metrics(job.metrics.path) if "loss" in r]
    logger.info("job %s: resumed from %s at step %d", job.name, latest.name,
                job.position.step)


def _checkpoint(run: ManyRun, job: Job) -> None:
    if not run.dist.main:
        return
    ckpt.save_checkpoint(job.out / "checkpoints", job.position, dict(job.params),
                         job.optimizer, job.scheduler, keep_last=job.config.keep_last,
                         write_adapter=lambda p: save_adapter(run.model, p, job.slot,
                                                              base_model=job.config.model))


def _all_sum(d: distributed.Dist, t: Tensor) -> Tensor:
    if d.world > 1:
        t = t.clone()
        torch_dist.all_reduce(t)
    return t


def _result(run: ManyRun, started: float, interrupted: bool = False) -> ManyResult:
    jobs = run.jobs
    return ManyResult({j.name: j.position.step for j in jobs},
                      {j.name: list(j.losses) for j in jobs},
                      {j.name: dict(j.evals) for j in jobs},
                      {j.name: j.error for j in jobs if j.error is not None},
                      time.perf_counter() - started, interrupted, run.eval_seconds)


def summary(result: ManyResult) -> list[dict[str, Any]]:
    """One line per job for reports: steps, last loss, eval figures, error."""
    return [{"job": name, "steps": steps,
             "loss": result.losses[name][-1] if result.losses[name] else None,
             **result.evals.get(name, {}), "error": result.errors.get(name)}
            for name, steps in result.steps.items()]

"""Embeddings through adapters, computed by the engine's loop between decode steps.

An embedding of a text is the feature routing compares (``surgery.features``): the last
hidden state (after the final norm) mean-pooled over the text's tokens, through the named
adapter (a store name, a tree path, or ``__base__``), scaled to unit length. Through
``__base__`` it is exactly the prompt's routing feature.

The model belongs to the engine's loop thread (a forward from another thread would race
with the running batch's slots and merged weights), so ``Engine.embed`` only checks the
inputs and queues an ``EmbeddingJob``; each loop iteration embeds up to ``STEP_ROWS``
inputs together (``EmbeddingWork``): the running jobs' next inputs first, then queued jobs,
each of which acquires its adapter in the slot table when it starts. The rows go through
the model with a slot per row. A job larger than an iteration's share runs over several
iterations, decode steps of the running requests in between, and holds its slot until its
last input is embedded, so every vector of one request comes from one adapter version
(a hot replace meanwhile reaches the next request). Jobs that arrive together share one
forward whatever adapters they name.

An adapter merged into the weights for the running batch stays merged: a forward with
per-row slots takes the merged adapter's branch out for every row and adds each row's
own (``LoraModule.forward``), the way a prefill runs while a batch is merged. Unmerging
instead would cost two passes over the weights per embedding batch and leave the merged
weights of the running batch rounded differently than before.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loratree.errors import AdapterInUseError, CacheFullError, NonFiniteError
from loratree.serve.requests import AUTO, prompt_ids
from loratree.serve.slot_table import SlotTable
from loratree.surgery.features import pooled_features

__all__ = ["BATCH_ROWS", "BATCH_TOKENS", "STEP_ROWS", "EmbeddingInput", "EmbeddingInputError",
           "EmbeddingJob", "EmbeddingQueue", "EmbeddingWork", "Embeddings", "check_adapter",
           "embedding_ids", "model_limits", "run_jobs"]

logger = logging.getLogger(__name__)

BATCH_ROWS = 32
"""Most inputs in one forward."""
BATCH_TOKENS = 8192
"""Most (padded) tokens in one forward; a longer input runs alone."""
STEP_ROWS = 64
"""Most inputs one loop iteration embeds (a larger job goes on in the next iterations),
so decode steps of running requests wait for at most about this much work."""

EmbeddingInput = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
"""OpenAI's forms: a text, a list of texts, token ids, or a list of token-id lists."""


class EmbeddingInputError(ValueError):
    """An embedding input the model cannot take; ``code`` is the API's error code."""

    def __init__(self, message: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one request's inputs, in order."""

    vectors: Tensor
    """(inputs, hidden) fp32 on the CPU, each of unit length."""
    prompt_tokens: int
    adapter: str


@dataclass(frozen=True)
class EmbeddingJob:
    """One request's inputs, as token ids, for one adapter; its future gets the result."""

    ids: tuple[tuple[int, ...], ...]
    adapter: str
    future: Future[Embeddings]


def model_limits(model: nn.Module) -> tuple[int, int]:
    """(vocabulary size, context length in tokens) of a transformers model."""
    config = model.config
    context = int(getattr(config, "max_position_embeddings", 0)
                  or getattr(config, "n_positions", 0) or 2048)
    return int(config.vocab_size), context


def embedding_ids(tokenizer: object, inputs: EmbeddingInput, vocab: int,
                  context: int) -> list[list[int]]:
    """``inputs`` as one token-id list per input; texts tokenized as a prompt
    (``prompt_ids``). Raises ``EmbeddingInputError`` naming what is wrong."""
    if isinstance(inputs, str):
        items: list = [inputs]
    elif isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], int):
        items = [inputs]  # one token-id list
    elif isinstance(inputs, Sequence):
        items = list(inputs)
    else:
        raise EmbeddingInputError(f"input must be a text, texts or token ids, not "
                                  f"{type(inputs).__name__}")
    if not items:
        raise EmbeddingInputError("the input is empty")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, str) and not all(isinstance(t, int) for t in item):
            raise EmbeddingInputError(f"input {i} is neither a text nor token ids")
        ids = [] if isinstance(item, str) and not item else list(
            prompt_ids(tokenizer, item) if isinstance(item, str) else item)
        if not ids:
            raise EmbeddingInputError(f"input {i} is empty")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise EmbeddingInputError(f"input {i}: token id {bad} is outside the vocabulary "
                                      f"(size {vocab})")
        if len(ids) > context:
            raise EmbeddingInputError(f"input {i} has {len(ids)} tokens; the model's context "
                                      f"is {context}", code="context_length_exceeded")
        out.append(ids)
    return out


def check_adapter(adapter: str) -> None:
    """Refuse ``auto``: an embedding is taken through the adapter the caller names."""
    if adapter == AUTO:
        raise EmbeddingInputError("embeddings need a named adapter or the base model, not "
                                  f"{AUTO!r}", code="invalid_model")


class EmbeddingQueue:
    """Jobs waiting for the loop; ``put`` from any thread, the rest from the loop's."""

    def __init__(self) -> None:
        self._jobs: deque[EmbeddingJob] = deque()
        self._lock = threading.Lock()

    def put(self, job: EmbeddingJob) -> None:
        with self._lock:
            self._jobs.append(job)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._jobs)

    def take(self, max_rows: int = STEP_ROWS) -> list[EmbeddingJob]:
        """The oldest jobs up to ``max_rows`` inputs in all (at least one job, if any)."""
        out: list[EmbeddingJob] = []
        rows = 0
        with self._lock:
            while self._jobs and (not out or rows + len(self._jobs[0].ids) <= max_rows):
                job = self._jobs.popleft()
                out.append(job)
                rows += len(job.ids)
        return out

    def put_back(self, jobs: list[EmbeddingJob]) -> None:
        """Return jobs to the front of the queue, in order."""
        with self._lock:
            self._jobs.extendleft(reversed(jobs))

    def fail_all(self, error: BaseException) -> None:
        """End every queued job with ``error`` (the engine is closing)."""
        for job in self.drain():
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def drain(self) -> list[EmbeddingJob]:
        """Take every queued job."""
        with self._lock:
            jobs, self._jobs = list(self._jobs), deque()
        return jobs


@dataclass
class _Running:
    """A started job: its adapter's slot (held until its last input), the vectors so far."""

    job: EmbeddingJob
    slot: int
    parts: list[Tensor] = field(default_factory=list)
    done: int = 0
    """Inputs embedded so far."""


class EmbeddingWork:
    """The loop's embedding work: ``queue``'s jobs, and the started ones, which hold their
    adapter's slot until their last input is embedded."""

    def __init__(self, queue: EmbeddingQueue, max_rows: int = STEP_ROWS) -> None:
        self.queue = queue
        self.max_rows = max_rows
        """Most inputs one ``step`` embeds (``bench.embedding_split`` ablates it)."""
        self.running: list[_Running] = []

    def pending(self) -> bool:
        return bool(self.running) or self.queue.pending()

    @torch.inference_mode()  # as the engine's step: slots filled here are inference tensors
    def step(self, model: nn.Module, table: SlotTable, *, can_wait: bool,
             max_rows: int | None = None) -> tuple[bool, BaseException | None]:
        """Embed up to ``max_rows`` (default ``self.max_rows``) inputs in shared forwards:
        the running jobs' next inputs first, then queued jobs as they start. A job whose
        adapter finds no slot (every slot held) goes back to the queue when ``can_wait``
        or started jobs hold slots, else fails; one whose adapter fails fails alone.
        Returns (whether any input was embedded, the forward's error if it failed: its
        jobs have it)."""
        budget = self.max_rows if max_rows is None else max_rows
        batch: list[tuple[_Running, int]] = []
        for run in self.running:
            n = min(len(run.job.ids) - run.done, budget)
            if n > 0:
                batch.append((run, n))
                budget -= n
        if budget > 0:
            waiting = []
            for job in self.queue.take(budget):
                slot = _start(job, table, can_wait=can_wait or bool(self.running))
                if slot is None:
                    waiting.append(job)
                elif slot != _FAILED:
                    self.running.append(run := _Running(job, slot))
                    n = min(len(job.ids), max(budget, 0))
                    if n > 0:
                        batch.append((run, n))
                        budget -= n
            self.queue.put_back(waiting)
        return bool(batch), self._forward(model, table, batch)

    def fail_all(self, table: SlotTable, error: BaseException) -> None:
        """End every started job with ``error`` and release its slot (closing)."""
        for run in self.running:
            table.release(run.slot)
            run.job.future.set_exception(error)
        self.running = []

    def _forward(self, model: nn.Module, table: SlotTable,
                 batch: list[tuple[_Running, int]]) -> BaseException | None:
        if not batch:
            return None
        rows = [ids for run, n in batch for ids in run.job.ids[run.done:run.done + n]]
        slots = [run.slot for run, n in batch for _ in range(n)]
        try:
            vectors = pooled_features(model, rows, slots, batch_size=BATCH_ROWS,
                                      max_tokens=BATCH_TOKENS)
        except Exception as e:
            logger.exception("an embedding forward of %d inputs failed", len(rows))
            for run, _ in batch:
                self._end(table, run, error=e)
            return e
        start = 0
        for run, n in batch:
            run.parts.append(vectors[start:start + n])
            run.done += n
            start += n
            if run.done == len(run.job.ids):
                self._end(table, run)
        return None

    def _end(self, table: SlotTable, run: _Running, error: BaseException | None = None
             ) -> None:
        self.running.remove(run)
        table.release(run.slot)
        job = run.job
        if error is not None:
            job.future.set_exception(error)
            return
        mine = torch.cat(run.parts)
        if not bool(torch.isfinite(mine).all()):
            job.future.set_exception(NonFiniteError(
                f"{job.adapter!r} gives non-finite hidden states for this input"))
            return
        job.future.set_result(Embeddings(mine, sum(len(i) for i in job.ids), job.adapter))


def run_jobs(model: nn.Module, table: SlotTable, jobs: list[EmbeddingJob], *,
             can_wait: bool) -> tuple[list[EmbeddingJob], BaseException | None]:
    """Embed ``jobs`` whole in shared forwards (``EmbeddingWork`` with no row limit: one
    iteration's work when they fit it) and complete their futures. Returns (the jobs that
    must wait for a slot, the forward's error if it failed: its jobs have it)."""
    queue = EmbeddingQueue()
    for job in jobs:
        queue.put(job)
    work = EmbeddingWork(queue)
    _, error = work.step(model, table, can_wait=can_wait, max_rows=sys.maxsize)
    return queue.drain(), error


_FAILED = -2
"""``_start``: the job failed (its future has the error)."""


def _start(job: EmbeddingJob, table: SlotTable, *, can_wait: bool) -> int | None:
    """Acquire ``job``'s adapter: its slot; None when it must wait for one; ``_FAILED``
    when it failed or was cancelled."""
    if job.future.cancelled():
        return _FAILED
    try:
        slot = table.acquire(job.adapter)
    except (AdapterInUseError, CacheFullError) as e:
        if can_wait:  # slots come back as requests and started jobs end
            return None
        _fail(job, e)
        return _FAILED
    except Exception as e:  # unknown or unusable adapter: this job alone
        _fail(job, e)
        return _FAILED
    if job.future.set_running_or_notify_cancel():
        return slot
    table.release(slot)
    return _FAILED


def _fail(job: EmbeddingJob, error: BaseException) -> None:
    logger.warning("embedding for %r failed: %s", job.adapter, error)
    if job.future.set_running_or_notify_cancel():
        job.future.set_exception(error)

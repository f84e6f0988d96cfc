"""Batched generation for many adapters at once, with continuous batching.

``Engine.submit(request)`` returns a ``Handle`` at once: iterate it for text as it is
produced, or call ``result()``. One loop (``step``; ``start`` runs it on a thread) does, per
iteration:

1. admit waiting requests while the batch has room: activate each one's adapter in the
   slot table (held until the request ends), prefill its prompt, sample its first token,
   and join its cache to the batch's; or, where the model allows it, set it aside for the
   next decode step to prefill in the same forward;
2. run one decode step for every running row: one forward of the batch, each row through
   its own slot, or with the batch's single adapter merged into the weights when the slot
   table's plan says so;
3. sample each row's next token with its own settings and generator, stream the new text,
   and retire rows that hit a stop string, the end-of-sequence token, their token budget,
   or were cancelled; their slots are released at once.

The engine wires two parts: the ``Scheduler`` (``serve.scheduler``: the queue, admission,
retirement and the merge plan; no model call) and the ``Runner`` (``serve.runner``:
prefill, decode and packed steps, and the batch's cache). It records a model call as
succeeded (``Health``) at the point where nothing after it can fail the step.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch
from torch import nn

from loratree.models.attention import check_attention, sliding_window
from loratree.serve.constrain import Grammars
from loratree.serve.cpu import CpuTuner, CpuTuning
from loratree.serve.embeddings import (
    EmbeddingInput,
    EmbeddingJob,
    EmbeddingQueue,
    Embeddings,
    EmbeddingWork,
    check_adapter,
    embedding_ids,
    model_limits,
)
from loratree.serve.packed import supports_packing
from loratree.serve.requests import AUTO, Completion, Handle, Request, prompt_ids
from loratree.serve.router import Router
from loratree.serve.runner import Runner
from loratree.serve.scheduler import Admitted, Batching, Policy, Scheduler, StepMode, StepPlan
from loratree.serve.slot_table import BASE, SlotTable

__all__ = ["Engine"]

DEFAULT_TUNING = CpuTuning()
"""Every CPU tuning piece: each won the ablation (``bench.cpu_ablation``)."""

logger = logging.getLogger(__name__)


class Engine:
    """Generation for requests that each name an adapter, batched together.

    ``max_batch`` bounds the running rows.
    ``pack_joins``: requests that join a running batch are prefilled inside its next
    decode step, as one packed sequence (``serve.packed``), where the model allows it.
    ``join_wait`` (only without packed joins): while rows are running, a request that
    would join alone (fewer waiting than free rows) waits up to this many prefill times (a
    running mean) for others, so one prefill stalls the batch for several; 0 joins at once.
    ``merge_min_tokens``: a batch all on one LoRA adapter runs it merged into the weights
    when it will run at least this many more tokens (``SlotTable.plan_slots``).
    ``cpu_tuning`` (on a CPU; ``serve.cpu``): the measured GEMM orientation on the model's
    plain linears and the caller's OpenMP pool released on ``start``, each switchable;
    ``close`` takes the orientation off the model again. Both are on by default because
    both won the ablation (``bench.cpu_ablation``); None turns them off.
    """

    def __init__(self, model: nn.Module, tokenizer: object, table: SlotTable, *,
                 max_batch: int = 8, merge_min_tokens: int = 16, router: Router | None = None,
                 cpu_tuning: CpuTuning | None = DEFAULT_TUNING, pack_joins: bool = True,
                 join_wait: float = 2.0) -> None:
        check_attention(model)  # an attention kind run wrong is refused, not served
        self.model, self.tokenizer, self.table = model, tokenizer, table
        self.windowed = sliding_window(model) is not None
        """Some layers attend over a sliding window: a row's columns must be contiguous
        (``serve.grouping``)."""
        self.router = router
        self.packs = pack_joins and supports_packing(model)
        """Whether joining requests (other than prefix adapters') prefill inside a decode
        step."""
        self.device = next(model.parameters()).device
        self.cpu = CpuTuner(model, cpu_tuning, self.device)
        """The CPU tuning asked for, installed on the model until ``close``."""
        policy = Policy(max_batch=max_batch, packs=self.packs, join_wait=join_wait,
                        merge_min_tokens=merge_min_tokens)
        self.scheduler = Scheduler(table, tokenizer, self._resolve, policy,
                                   windowed=self.windowed)
        self.grammars = Grammars(tokenizer, int(model.config.vocab_size), self.scheduler.eos)
        """Structured outputs: the grammars of requests with a ``constraint``."""
        self.runner = Runner(model, table, self.packs, self.grammars)
        self.embeddings = EmbeddingQueue()
        self.embedding_work = EmbeddingWork(self.embeddings)
        """Embedding jobs waiting for the loop (``serve.embeddings``)."""
        self._ids = itertools.count()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = threading.Event()

    @classmethod
    def static_baseline(cls, model: nn.Module, tokenizer: object, table: SlotTable,
                        **options: object) -> Engine:
        """An engine that admits new requests only when its batch is empty: the static
        batching baseline the benchmarks measure continuous batching against."""
        engine = cls(model, tokenizer, table, **options)
        engine.scheduler.policy = dataclasses.replace(engine.scheduler.policy,
                                                      batching=Batching.STATIC)
        return engine

    # -- what the server and the metrics read ----------------------------------------------
    @property
    def modes(self) -> dict[StepMode, int]:
        """Decode steps run in each mode."""
        return self.scheduler.modes

    @property
    def step_rows(self) -> dict[int, int]:
        """Decode steps by the number of rows (requests) each served, a copy."""
        return dict(self.scheduler.step_rows)

    @property
    def packed_joins(self) -> int:
        """Requests prefilled inside a decode step."""
        return self.scheduler.packed_joins

    @property
    def faults(self) -> int:
        """Engine faults: steps that raised (their running requests fail with the error)
        and admissions that failed for reasons other than the request itself."""
        return self.scheduler.health.faults

    @property
    def consecutive_failures(self) -> int:
        return self.scheduler.health.consecutive_failures

    @property
    def last_error(self) -> str | None:
        return self.scheduler.health.last_error

    # -- submitting ------------------------------------------------------------------------
    def submit(self, request: Request,
               on_event: Callable[[], None] | None = None) -> Handle:
        """Queue ``request`` (one choice: ``n`` = 1); ``on_event`` (if given) is called from
        the engine's thread whenever the handle has new text or has ended. A ``constraint``
        whose schema cannot be enforced is a ``ResponseFormatError`` here (compiled once,
        then cached)."""
        if request.n != 1:
            raise ValueError(f"submit takes n = 1, got n = {request.n}: use submit_choices")
        return self.submit_choices(request, on_event)[0]

    def submit_choices(self, request: Request,
                       on_event: Callable[[], None] | None = None) -> list[Handle]:
        """Queue ``request``'s ``n`` choices: one handle each, in choice order. They share
        one prefill of the prompt (its cache row is copied, one row per choice) and then
        decode as rows of their own; choice j samples with seed ``seed + j`` (with a seed,
        choice j equals the same request alone with seed ``seed + j`` and ``n`` = 1)."""
        return self.submit_batch([request], on_event)[0]

    def submit_batch(self, requests: Sequence[Request],
                     on_event: Callable[[], None] | None = None) -> list[list[Handle]]:
        """Queue ``requests`` together (the loop sees all or none of them, so they are
        admitted, and prefilled, together as far as the batch has room); each request's
        choices' handles, as ``submit_choices``."""
        limit = self.scheduler.policy.max_batch
        for r in requests:
            if r.n > limit:
                raise ValueError(f"n = {r.n} is more than the engine's max_batch ({limit})")
            if r.constraint is not None:
                self.grammars.compile(r.constraint)
        groups = [[Handle(next(self._ids), r, on_event, choice=j) for j in range(r.n)]
                  for r in requests]
        self.scheduler.submit_all(groups)
        self._wake.set()
        return groups

    def generate(self, request: Request) -> Completion:
        """Submit and wait (runs the loop here if no thread runs it)."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                self.step()
        return handle.result()

    def embed(self, inputs: EmbeddingInput, adapter: str = BASE) -> Future[Embeddings]:
        """Queue the embeddings of ``inputs`` (a text, texts, token ids, or token-id lists)
        through ``adapter`` (a store name, a tree path, or ``__base__``); the loop computes
        them between decode steps, batched with other jobs (``serve.embeddings``); runs
        the loop here until they are done if no thread runs it. Bad inputs raise
        ``EmbeddingInputError`` at once; an unknown adapter fails the future
        (``AdapterNotFoundError``)."""
        check_adapter(adapter)
        ids = embedding_ids(self.tokenizer, inputs, *model_limits(self.model))
        future: Future[Embeddings] = Future()
        self.embeddings.put(EmbeddingJob(tuple(map(tuple, ids)), adapter, future))
        self._wake.set()
        if self._thread is None:
            while not future.done():
                self.step()
        return future

    # -- the loop --------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the loop on a daemon thread until ``close``; with CPU tuning, returns once
        the loop has made the linears' orientation choices, so no request waits for them,
        and releases the calling thread's OpenMP pool first (``CpuTuner.before_start``)."""
        if self._thread is None:
            self.cpu.before_start()
            self._thread = threading.Thread(target=self._loop, name="loratree-engine",
                                            daemon=True)
            self._thread.start()
            self._ready.wait()
        return self

    def close(self) -> None:
        """Stop the loop (if started) and take the CPU tuning off the model: after this
        the model holds nothing of the engine's CPU tuning."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        closed = RuntimeError("the engine was closed")
        self.embedding_work.fail_all(self.table, closed)
        self.embeddings.fail_all(closed)
        self.cpu.close()

    def busy(self) -> bool:
        return self.scheduler.busy() or self.embedding_work.pending()

    def load(self) -> tuple[int, int]:
        """(requests waiting to be admitted, requests running)."""
        return self.scheduler.load()

    @property
    def alive(self) -> bool:
        """False once a started loop's thread has died."""
        return self._thread is None or self._thread.is_alive() or self._stopping

    def _loop(self) -> None:
        try:
            self.cpu.warm()  # in this thread, now: the first requests do not wait for it
        except Exception:
            logger.exception("warming the linears failed; they measure on first use")
        finally:
            self._ready.set()
        while not self._stopping:
            if not self.busy():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server's loop
                logger.exception("engine step failed")
                self.scheduler.health.failed(e)
                self._fail_running(e)

    def _fail_running(self, error: BaseException) -> None:
        """End every running request with ``error`` and drop the batch's cache, so a failed
        step never leaves requests hanging."""
        self.runner.drop()
        self.scheduler.fail_running(error)

    @torch.inference_mode()
    def step(self) -> None:
        """Embed the queued inputs, admit, decode one token for every running row, retire
        finished rows."""
        if self.embedding_work.pending():
            self._embed()
        self._prefill_or_reject(self.scheduler.admit(self.runner.prefill_s))
        self._retire()
        orphans = self.scheduler.orphans()  # the batch they were to join has ended
        if orphans:
            self._prefill_or_reject(orphans)
            self._retire()
        if self.scheduler.rows:
            self._decode()
            self._retire()

    def _embed(self) -> None:
        """Embed up to ``STEP_ROWS`` inputs of the started and queued embedding jobs in
        shared forwards; a job whose adapter found no free slot stays queued. A failed
        forward fails its jobs only, never the running requests."""
        progressed, error = self.embedding_work.step(self.model, self.table,
                                                     can_wait=bool(self.scheduler.rows))
        if error is not None:
            self.scheduler.health.failed(error)
        elif progressed:
            self.scheduler.health.ok()

    def _resolve(self, req: Request) -> tuple[list[int], str]:
        """A request's prompt ids and adapter (``auto``: the router's choice)."""
        ids = prompt_ids(self.tokenizer, req.prompt)
        adapter = req.adapter
        if adapter == AUTO:
            if self.router is None:
                self.router = Router(self.table.cache.source, self.model)
            adapter = self.router.route(ids).adapter
        return ids, adapter

    # -- running what the scheduler decided ------------------------------------------------
    def _prefill_or_reject(self, group: list[Admitted]) -> None:
        """Prefill ``group`` (one forward, or by prompt on a windowed model); the requests
        of a forward that fails end with its error."""
        if not group:
            return
        for part in self.scheduler.prefill_parts(group):
            try:
                prefilled = self.runner.prefill(part)
                # nothing above raised: the rows join the batch together (a row whose first
                # token failed carries its error and retires at once)
                self.scheduler.health.ok()
                self.runner.join(prefilled.kv)
                self.runner.select(self.scheduler.add(prefilled.rows))
            except Exception as e:
                self.scheduler.reject_all(part, e)

    def _decode(self) -> None:
        """One decode step for every running row, prefilling the joining requests in the
        same forward (``serve.packed``) when there are any."""
        plan = self.scheduler.plan_step()
        if self.scheduler.joining:
            self._packed_step(plan)
            return
        rows = self.scheduler.rows
        out = self.runner.decode_forward(rows, plan.slots, plan.uniform)
        self.scheduler.health.ok()
        self.runner.decode_finish(rows, out)

    def _packed_step(self, plan: StepPlan) -> None:
        """The decode step of the running rows and the prefill of the joiners as one
        forward; a failure fails the joiners here and the running rows in the loop."""
        rows, joining = self.scheduler.rows, self.scheduler.joining
        try:
            out = self.runner.packed_forward(rows, joining, plan.uniform)
        except BaseException as e:
            self.scheduler.fail_joining(e)
            raise
        self.scheduler.take_joining()
        self.scheduler.health.ok()
        joined = self.runner.packed_finish(rows, joining, out)
        self.runner.select(self.scheduler.add(joined, packed=True))

    def _retire(self) -> None:
        self.runner.select(self.scheduler.retire())

"""Batched generation for many adapters at once, with continuous batching.

``Engine.submit(request)`` returns a ``Handle`` at once: iterate it for text as it is
produced, or call ``result()``. One loop (``step``; ``start`` runs it on a thread) does, per
iteration:

1. admit waiting requests while the batch has room: activate each one's adapter in the
   slot table (held until the request ends), prefill its prompt alone (a prefix adapter
   enters its cache here), sample its first token, and join its cache to the batch's,
   right-aligned (``BatchKV``);
2. run one decode step for every running row: one forward of the batch, each row through
   its own slot (LoRA, prefix, or -1 for the base model), or with the batch's single
   adapter merged into the weights when the slot table's plan says so;
3. sample each row's next token with its own settings and generator, stream the new text,
   and retire rows that hit a stop string, the end-of-sequence token, their token budget,
   or were cancelled; their slots are released at once.

Positions are tracked per row, so a row's tokens are at the positions they would have
alone, whatever joined before or after it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache

from loratree.errors import AdapterInUseError, CacheFullError
from loratree.models.attention import check_attention, layer_windows, sliding_window
from loratree.models.compat import cache_kwargs, forward_takes, output_cache
from loratree.serve.cpu import CpuTuner, CpuTuning
from loratree.serve.grouping import prefill_groups
from loratree.serve.kv import BatchKV
from loratree.serve.packed import pack, supports_packing
from loratree.serve.requests import AUTO, Completion, Handle, Request, prompt_ids
from loratree.serve.router import Router
from loratree.serve.rows import Row, finite_rows
from loratree.serve.slot_table import SlotTable
from loratree.surgery.prefix import prefix_state

__all__ = ["Engine"]

DEFAULT_TUNING = CpuTuning()
"""Every CPU tuning piece: each won the ablation (``bench.cpu_ablation``)."""

logger = logging.getLogger(__name__)

PACK_TOKENS = 512
"""Most prompt tokens a decode step prefills for joining requests; a longer prompt is
prefilled on its own (a packed step's mask is dense: tokens x cached entries)."""

_Admitted = tuple[Handle, list[int], str, int]
"""An admitted request: its handle, prompt ids, adapter and the slot it holds."""


class Engine:
    """Generation for requests that each name an adapter, batched together.

    ``max_batch`` bounds the running rows; ``static`` admits new requests only when the
    batch is empty (the baseline continuous batching is measured against).
    ``pack_joins``: requests that join a running batch are prefilled inside its next
    decode step, as one packed sequence (``serve.packed``), where the model allows it.
    ``join_wait`` (only without packed joins): while rows are running, a request that
    would join alone (fewer waiting than free rows) waits up to this many prefill times (a
    running mean) for others, so one prefill stalls the batch for several; 0 joins at once.
    ``cpu_tuning`` (on a CPU; ``serve.cpu``): the measured GEMM orientation on the model's
    plain linears and the caller's OpenMP pool released on ``start``, each switchable;
    ``close`` takes the orientation off the model again. Both are on by default because
    both won the ablation (``bench.cpu_ablation``); None turns them off.
    """

    def __init__(self, model: nn.Module, tokenizer: object, table: SlotTable, *,
                 max_batch: int = 8, static: bool = False, keep_logits: bool = False,
                 merge_min_tokens: int = 16, router: Router | None = None,
                 cpu_tuning: CpuTuning | None = DEFAULT_TUNING, pack_joins: bool = True,
                 join_wait: float = 2.0) -> None:
        check_attention(model)  # an attention kind run wrong is refused, not served
        self.model, self.tokenizer, self.table = model, tokenizer, table
        self.windowed = sliding_window(model) is not None
        """Some layers attend over a sliding window: a row's columns must be contiguous
        (``serve.grouping``)."""
        self.router = router
        self.max_batch, self.static, self.keep_logits = max_batch, static, keep_logits
        self.merge_min_tokens = merge_min_tokens
        self.join_wait = join_wait
        self.packs = pack_joins and supports_packing(model)
        """Whether joining requests (other than prefix adapters') prefill inside a decode
        step."""
        self._mask_dtype = (None if getattr(model.config, "_attn_implementation", "") == "sdpa"
                            else next(model.parameters()).dtype) if self.packs else None
        self._joining: list[_Admitted] = []
        """Admitted requests whose prompts the next decode step prefills."""
        self.packed_joins = 0
        """Requests prefilled inside a decode step."""
        self._prefill_s: float | None = None
        """Running mean (EMA) of a prefill's wall time, the unit of ``join_wait``."""
        self.device = next(model.parameters()).device
        self.cpu = CpuTuner(model, cpu_tuning, self.device)
        """The CPU tuning asked for, installed on the model until ``close``."""
        self._waiting: deque[Handle] = deque()
        self._rows: list[Row] = []
        self._kv: BatchKV | None = None
        self._last_logits_only = (
            {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {})
        """Prefill computes the LM head for the last position only, where the model can."""
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = threading.Event()
        self.modes: dict[str, int] = {"merged": 0, "unmerged": 0}
        """Decode steps run in each mode."""
        self.faults = 0
        """Engine faults: steps that raised (their running requests fail with the error) and
        admissions that failed for reasons other than the request itself."""
        self.consecutive_failures = 0
        self.last_error: str | None = None
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    # -- submitting ------------------------------------------------------------------------
    def submit(self, request: Request,
               on_event: Callable[[], None] | None = None) -> Handle:
        """Queue ``request``; ``on_event`` (if given) is called from the engine's thread
        whenever the handle has new text or has ended."""
        handle = Handle(next(self._ids), request, on_event)
        with self._lock:
            self._waiting.append(handle)
        self._wake.set()
        return handle

    def generate(self, request: Request) -> Completion:
        """Submit and wait (runs the loop here if no thread runs it)."""
        handle = self.submit(request)
        if self._thread is None:
            while not handle.done:
                self.step()
        return handle.result()

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
        self.cpu.close()

    def busy(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._rows)

    def load(self) -> tuple[int, int]:
        """(requests waiting to be admitted, requests running)."""
        with self._lock:
            return len(self._waiting), len(self._rows)

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
                self._failed(e)
                self._fail_running(e)

    def _failed(self, error: BaseException) -> None:
        """Record an engine fault (health reports it until a model call succeeds)."""
        self.faults += 1
        self.consecutive_failures += 1
        self.last_error = f"{type(error).__name__}: {error}"

    def _fail_running(self, error: BaseException) -> None:
        """End every running request with ``error`` and drop the batch's cache, so a failed
        step never leaves requests hanging."""
        self._fail_joining(error)
        rows, self._rows, self._kv = self._rows, [], None
        for row in rows:
            try:
                self.table.release(row.slot)
            except Exception:
                logger.exception("releasing slot %d failed", row.slot)
            self._end(row.handle, "error", row.tokens, row.text, row.prompt_len,
                      first=row.first_token_s, error=error, adapter=row.adapter)

    def _fail_joining(self, error: BaseException) -> None:
        """End the requests admitted to join the next decode step with ``error``."""
        joining, self._joining = self._joining, []
        for handle, _, adapter, slot in joining:
            self.table.release(slot)
            self._end(handle, "error", [], "", 0, error=error, adapter=adapter)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, decode one token for every running row, retire finished rows."""
        self._admit()
        self._retire()
        if self._joining and not self._rows:  # the batch they were to join has ended
            group, self._joining = self._joining, []
            self._prefill_or_reject(group)
            self._retire()
        if self._rows:
            self._decode()
            self._retire()

    # -- admitting -------------------------------------------------------------------------
    def _admit(self) -> None:
        """Take waiting requests while the batch has room, activate their adapters, and
        prefill them together in one forward."""
        if self.static and self._rows:
            return
        if self._wait_for_company():
            return
        group: list[_Admitted] = []
        while len(self._rows) + len(group) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if handle.cancelled:
                self._end(handle, "cancelled", [], "", 0)
                continue
            try:
                ids, adapter = self._resolve(handle.request)
                slot = self.table.acquire(adapter)
            except (AdapterInUseError, CacheFullError) as e:
                if self._rows or group:  # room comes back as running rows finish
                    with self._lock:
                        self._waiting.appendleft(handle)
                    break
                self._reject(handle, e)
                continue
            except Exception as e:  # a bad request fails alone
                self._reject(handle, e)
                continue
            group.append((handle, ids, adapter, slot))
        if not group:
            return
        if self.packs and self._rows:
            group = self._to_pack(group)
        if group:
            self._prefill_or_reject(group)

    def _to_pack(self, group: list[_Admitted]) -> list[_Admitted]:
        """Set aside for the next decode step the requests it can prefill (not a prefix
        adapter's; up to ``PACK_TOKENS`` prompt tokens in all); returns the others."""
        alone, total = [], 0
        for g in group:
            if self.table.kind_of(g[3]) != "prefix" and total + len(g[1]) <= PACK_TOKENS:
                self._joining.append(g)
                total += len(g[1])
            else:
                alone.append(g)
        return alone

    def _prefill_or_reject(self, group: list[_Admitted]) -> None:
        parts = prefill_groups([len(ids) for _, ids, _, _ in group],
                               [self.table.kind_of(s) == "prefix" for *_, s in group],
                               self.windowed)  # one forward, or by prompt (windowed models)
        for part in ([group[i] for i in part] for part in parts):
            part.sort(key=lambda g: g[3])  # by slot: adjacent rows share a slot (runs path)
            try:
                self._prefill(part)
            except Exception as e:
                for handle, _, _, slot in part:
                    self.table.release(slot)
                    self._reject(handle, e)

    def _wait_for_company(self) -> bool:
        """True while fewer requests wait than rows are free and the oldest has waited
        under ``join_wait`` prefill times: one prefill then serves several of them."""
        if self.packs or not self._rows or self.join_wait <= 0 or self._prefill_s is None:
            return False
        with self._lock:
            waiting = len(self._waiting)
            oldest = self._waiting[0].submitted if waiting else None
        return (oldest is not None and waiting < self.max_batch - len(self._rows)
                and time.perf_counter() - oldest < self.join_wait * self._prefill_s)

    def _reject(self, handle: Handle, error: Exception) -> None:
        logger.warning("request %d failed: %s", handle.id, error)
        if not isinstance(error, ValueError | KeyError | CacheFullError):  # not the request
            self._failed(error)
        self._end(handle, "error", [], "", 0, error=error)

    def _resolve(self, req: Request) -> tuple[list[int], str]:
        ids = prompt_ids(self.tokenizer, req.prompt)
        adapter = req.adapter
        if adapter == AUTO:
            if self.router is None:
                self.router = Router(self.table.cache.store, self.model)
            adapter = self.router.route(ids).adapter
        return ids, adapter

    def _prefill(self, group: list[_Admitted]) -> None:
        """One forward over the new requests' prompts, left-padded to the longest (the
        batch cache's right-aligned layout), each row through its own slot."""
        n, width = len(group), max(len(ids) for _, ids, _, _ in group)
        input_ids = torch.zeros(n, width, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, (_, ids, _, _) in enumerate(group):
            input_ids[i, width - len(ids):] = torch.tensor(ids, device=self.device)
            mask[i, width - len(ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        slots = [slot for _, _, _, slot in group]
        use: int | torch.Tensor = (slots[0] if len(set(slots)) == 1
                                   else torch.tensor(slots, device=self.device))
        started = time.perf_counter()
        # a cache of full layers: sliding-window layers keep every column too, so all
        # layers' keys line up with the batch's mask (the window lives in the mask)
        with self.table.ctx.use(use):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **self._last_logits_only,
                             **cache_kwargs(self.model, DynamicCache()))
        took = time.perf_counter() - started
        self._prefill_s = took if self._prefill_s is None else 0.8 * self._prefill_s + 0.2 * took
        cache = output_cache(out)
        prefix_mask, starts = prefix_state(cache, n, self.device)
        kv = BatchKV.from_cache(cache, torch.cat([prefix_mask, mask], dim=1))
        rows = []
        last = out.logits[:, -1]
        finite = finite_rows(last)
        for i, (handle, ids, adapter, slot) in enumerate(group):
            row = Row.start(handle, adapter, slot, len(ids), int(starts[i]) + len(ids))
            row.take(last[i], finite[i], self.keep_logits)
            rows.append(row)
        # nothing above raised: the rows join the batch together (a row whose first token
        # failed carries its error and retires at once)
        self.consecutive_failures = 0
        self._kv = kv if self._kv is None else self._kv.join(kv)
        self._rows += rows
        self._sort_rows()

    def _sort_rows(self) -> None:
        """Keep the running rows sorted by slot (the cache rows with them; rows leaving
        keep the order). A decode step whose slots have as many rows each then lays its
        rows out per slot as a view, with no gather (``ops.slots.grouped_layout``)."""
        slots = [r.slot for r in self._rows]
        if all(x <= y for x, y in itertools.pairwise(slots)):
            return
        order = sorted(range(len(slots)), key=slots.__getitem__)
        self._rows = [self._rows[i] for i in order]
        self._kv = self._kv.select(order)

    # -- decoding --------------------------------------------------------------------------
    def _decode(self) -> None:
        """One decode step for every running row, prefilling the joining requests in the
        same forward (``serve.packed``) when there are any."""
        assert self._kv is not None
        rows, joining = self._rows, self._joining
        slots = [r.slot for r in rows] + [g[3] for g in joining]
        plan = self.table.plan_slots(
            slots, self.merge_min_tokens,
            min([r.handle.request.max_new_tokens - len(r.tokens) for r in rows]
                + [g[0].request.max_new_tokens for g in joining]))
        self.modes[plan.mode] += 1
        if plan.mode == "unmerged" and self.table.merged_index is not None:
            self.table.unmerge()  # else every layer subtracts it again at every step
        use: int | torch.Tensor = (
            plan.slots[0] if plan.mode == "merged"
            else slots[0] if len(set(slots)) == 1  # no per-row gather at all
            else None)
        if joining:
            self._packed_step(rows, joining, use)
            return
        if use is None:
            use = torch.tensor(slots, device=self.device)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        mask = torch.cat([self._kv.mask, torch.ones(len(rows), 1, dtype=torch.long,
                                                    device=self.device)], dim=1)
        positions = torch.tensor([[r.next_pos] for r in rows], device=self.device)
        with self.table.ctx.use(use):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **cache_kwargs(self.model, self._kv.cache()))
        self.consecutive_failures = 0
        self._kv = self._kv.append(output_cache(out))
        self._advance(rows, out.logits[:, -1])

    def _advance(self, rows: list[Row], last: torch.Tensor) -> list[bool]:
        """Each running row moves one position on and takes its next token from its row of
        ``last`` (logits, rows first, then any joiners'); the finite flag of every row of
        ``last``."""
        finite = finite_rows(last)
        for i, row in enumerate(rows):
            row.next_pos += 1
            row.take(last[i], finite[i], self.keep_logits)
        return finite

    def _packed_step(self, rows: list[Row], joining: list[_Admitted],
                     use: int | torch.Tensor | None) -> None:
        """The decode step of ``rows`` and the prefill of ``joining`` as one sequence."""
        assert self._kv is not None
        try:
            step = pack(self._kv, [r.tokens[-1] for r in rows], [r.next_pos for r in rows],
                        [ids for _, ids, _, _ in joining], self._mask_dtype,
                        layer_windows(self.model))
            if use is None:  # a slot per token: each row's one, then each prompt's
                use = torch.tensor([[r.slot for r in rows]
                                    + [s for _, ids, _, s in joining for _ in ids]],
                                   device=self.device)
            with self.table.ctx.use(use) as ctx:
                ctx.kept = step.logits_to_keep  # a copied LM head sees these tokens only
                out = self.model(**step.forward_kwargs(),
                                 **cache_kwargs(self.model, step.cache))
            new, joined = step.new_entries(output_cache(out))
        except BaseException as e:  # the joiners fail here; the running rows by the caller
            self._fail_joining(e)
            raise
        self._joining = []
        self.consecutive_failures = 0
        cache = self._kv.cache()
        for layer, (k, v) in zip(cache.layers, new, strict=True):
            layer.update(k, v)
        self._kv = self._kv.append(cache).join(joined)
        last = out.logits[0]
        finite = self._advance(rows, last)
        joined_rows = []
        for j, (handle, ids, adapter, slot) in enumerate(joining, start=len(rows)):
            row = Row.start(handle, adapter, slot, len(ids), len(ids))
            row.take(last[j], finite[j], self.keep_logits)
            joined_rows.append(row)
        self._rows = rows + joined_rows
        self.packed_joins += len(joining)
        self._sort_rows()

    def _retire(self) -> None:
        keep = []
        for i, row in enumerate(self._rows):
            reason, text = row.status(self.tokenizer, self.eos)
            if reason is None:
                keep.append(i)
                continue
            self.table.release(row.slot)
            self._end(row.handle, reason, row.tokens, text, row.prompt_len,
                      first=row.first_token_s, adapter=row.adapter, error=row.error)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        self._kv = self._kv.select(keep) if keep and self._kv is not None else None

    def _end(self, handle: Handle, reason: str, tokens: list[int], text: str,
             prompt_len: int, *, first: float = 0.0, error: BaseException | None = None,
             adapter: str | None = None) -> None:
        total = time.perf_counter() - handle.submitted
        message = None if error is None else f"{type(error).__name__}: {error}"
        handle._finish(Completion(text, tuple(tokens), reason,
                                  adapter or handle.request.adapter, prompt_len, message, first,
                                  total, error))


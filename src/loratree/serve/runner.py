"""The model's part of the engine: prefill, decode step, packed step, and the batch's cache.

Each request is prefilled with its prompt left-padded to the longest of its group (a
prefix adapter enters its cache here), so its cache joins the batch's right-aligned
(``BatchKV``). A decode step is one forward of the batch, each row through its own slot
(LoRA, prefix, or -1 for the base model) or all through one; a packed step also prefills
the joining requests in the same forward (``serve.packed``). Positions are tracked per row,
so a row's tokens are at the positions they would have alone, whatever joined before or
after it. Then each row samples its next token (``Row.take``).

The runner keeps the cache row for row with the scheduler's rows: the engine passes it
the indices to keep whenever rows leave or change order. Model calls are split from
what follows them (``*_forward`` / ``*_finish``) so the engine records a successful call
at the point where the following work cannot undo it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from loratree.models.attention import layer_windows
from loratree.models.compat import cache_kwargs, forward_takes, output_cache
from loratree.ops.logprobs import token_logprobs
from loratree.serve.constrain import Grammars
from loratree.serve.kv import BatchKV
from loratree.serve.packed import pack
from loratree.serve.requests import Handle, TokenLogprob
from loratree.serve.rows import Row, finite_rows, records
from loratree.serve.scheduler import Admitted
from loratree.serve.slot_table import SlotTable
from loratree.surgery.prefix import prefix_state

__all__ = ["Decoded", "LogitsHook", "PackedOutput", "Prefilled", "Runner", "choice_rows",
           "prompt_records"]

LogitsHook = Callable[[Handle, torch.Tensor], None]
"""Called with each row's logits (V,) before it samples from them (tests record them)."""


@dataclass(frozen=True)
class Prefilled:
    """A prefill's new rows (each with its first token) and their cache."""

    rows: list[Row]
    kv: BatchKV


@dataclass(frozen=True)
class Decoded:
    """What a decode forward gave: the last position's logits (B, V) and its cache."""

    logits: torch.Tensor
    cache: DynamicCache


@dataclass(frozen=True)
class PackedOutput:
    """What a packed forward gave: the step's logits (one row per running row, then per
    joiner), the running rows' new cache entries per layer, and the joiners' cache."""

    logits: torch.Tensor
    new: list[tuple[torch.Tensor, torch.Tensor]]
    joined: BatchKV


class Runner:
    """Runs the model for the engine: a batch cache and the forwards that grow it."""

    def __init__(self, model: nn.Module, table: SlotTable, packs: bool,
                 grammars: Grammars | None = None) -> None:
        self.model, self.table = model, table
        self.grammars = grammars
        """Where a request with a ``constraint`` gets its row's matcher."""
        self.device = next(model.parameters()).device
        self.mask_dtype = (None if getattr(model.config, "_attn_implementation", "") == "sdpa"
                           else next(model.parameters()).dtype) if packs else None
        """The packed step's mask dtype: None (boolean) for sdpa, else additive."""
        self._last_logits_only = (
            {"logits_to_keep": 1} if forward_takes(model, "logits_to_keep") else {})
        """Prefill computes the LM head for the last position only, where the model can."""
        self.kv: BatchKV | None = None
        """The running rows' cache, row for row."""
        self.prefill_s: float | None = None
        """Running mean (EMA) of a prefill's wall time, the unit of ``join_wait``."""
        self.on_logits: LogitsHook | None = None
        """A test hook: sees every row's logits before the row samples."""

    # -- the batch cache -------------------------------------------------------------------
    def select(self, rows: list[int] | None) -> None:
        """Keep the cache rows ``rows``, in that order (None: no change; empty: none)."""
        if rows is None:
            return
        self.kv = self.kv.select(rows) if rows and self.kv is not None else None

    def drop(self) -> None:
        """Forget the batch's cache (its requests have failed)."""
        self.kv = None

    def join(self, kv: BatchKV) -> None:
        """Append new rows' cache to the batch's."""
        self.kv = kv if self.kv is None else self.kv.join(kv)

    # -- prefill ---------------------------------------------------------------------------
    def prefill(self, group: Sequence[Admitted]) -> Prefilled:
        """One forward over the new requests' prompts, left-padded to the longest (the
        batch cache's right-aligned layout), each row through its own slot."""
        n, width = len(group), max(len(a.ids) for a in group)
        input_ids = torch.zeros(n, width, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for i, a in enumerate(group):
            input_ids[i, width - len(a.ids):] = torch.tensor(a.ids, device=self.device)
            mask[i, width - len(a.ids):] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        slots = [a.slot for a in group]
        use = slots[0] if len(set(slots)) == 1 else torch.tensor(slots, device=self.device)
        started = time.perf_counter()
        # a cache of full layers: sliding-window layers keep every column too, so all
        # layers' keys line up with the batch's mask (the window lives in the mask)
        full = any(a.full_logits for a in group)  # the scheduler keeps these apart
        with self.table.ctx.use(use):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **({} if full else self._last_logits_only),
                             **cache_kwargs(self.model, DynamicCache()))
        took = time.perf_counter() - started
        self.prefill_s = took if self.prefill_s is None else 0.8 * self.prefill_s + 0.2 * took
        cache = output_cache(out)
        prefix_mask, starts = prefix_state(cache, n, self.device)
        kv = BatchKV.from_cache(cache, torch.cat([prefix_mask, mask], dim=1))
        last = out.logits[:, -1]
        finite = finite_rows(last)
        rows = []
        for i, a in enumerate(group):
            prompt = prompt_records(out.logits[i], a) if a.full_logits else None
            for h in a.handles:
                row = self._start(a, h, int(starts[i]) + len(a.ids))
                row.prompt_logprobs = h.prompt_logprobs = prompt
                if h.request.max_new_tokens > 0:
                    self._take(row, last[i], finite[i])
                rows.append(row)
        return Prefilled(rows, choice_rows(kv, group))

    # -- decode ----------------------------------------------------------------------------
    def decode_forward(self, rows: list[Row], slots: Sequence[int],
                       uniform: int | None) -> Decoded:
        """One decode forward of ``rows`` (each through its slot in ``slots``, or all
        through ``uniform``). The batch's cache takes the new entries in ``decode_finish``."""
        assert self.kv is not None
        use = uniform if uniform is not None else torch.tensor(list(slots), device=self.device)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        mask = torch.cat([self.kv.mask, torch.ones(len(rows), 1, dtype=torch.long,
                                                   device=self.device)], dim=1)
        positions = torch.tensor([[r.next_pos] for r in rows], device=self.device)
        with self.table.ctx.use(use):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             use_cache=True, **cache_kwargs(self.model, self.kv.cache()))
        return Decoded(out.logits[:, -1], output_cache(out))

    def decode_finish(self, rows: list[Row], out: Decoded) -> None:
        """The decode step's new cache entries join the batch's; each row takes its token."""
        assert self.kv is not None
        self.kv = self.kv.append(out.cache)
        self._advance(rows, out.logits)

    # -- packed step -----------------------------------------------------------------------
    def packed_forward(self, rows: list[Row], joining: Sequence[Admitted],
                       uniform: int | None) -> PackedOutput:
        """The decode step of ``rows`` and the prefill of ``joining`` as one sequence."""
        assert self.kv is not None
        step = pack(self.kv, [r.tokens[-1] for r in rows], [r.next_pos for r in rows],
                    [list(a.ids) for a in joining], self.mask_dtype, layer_windows(self.model))
        use = uniform if uniform is not None else torch.tensor(  # a slot per token
            [[r.slot for r in rows] + [a.slot for a in joining for _ in a.ids]],
            device=self.device)
        with self.table.ctx.use(use) as ctx:
            ctx.kept = step.logits_to_keep  # a copied LM head sees these tokens only
            out = self.model(**step.forward_kwargs(), **cache_kwargs(self.model, step.cache))
        new, joined = step.new_entries(output_cache(out))
        return PackedOutput(out.logits[0], new, joined)

    def packed_finish(self, rows: list[Row], joining: Sequence[Admitted],
                      out: PackedOutput) -> list[Row]:
        """The running rows' new entries go back into the batch cache and each joiner's
        cache joins it as a row; every row takes its token. Returns the joiners' rows."""
        assert self.kv is not None
        cache = self.kv.cache()
        for layer, (k, v) in zip(cache.layers, out.new, strict=True):
            layer.update(k, v)
        self.kv = self.kv.append(cache).join(choice_rows(out.joined, joining))
        finite = self._advance(rows, out.logits)
        joined_rows = []
        for j, a in enumerate(joining, start=len(rows)):
            for h in a.handles:
                row = self._start(a, h, len(a.ids))
                self._take(row, out.logits[j], finite[j])
                joined_rows.append(row)
        return joined_rows

    # -- sampling --------------------------------------------------------------------------
    def _start(self, a: Admitted, handle: Handle, next_pos: int) -> Row:
        """The row of one choice of a prefilled request, with its own grammar matcher if it
        has a format."""
        fmt = handle.request.constraint
        if fmt is None:
            return Row.start(handle, a.adapter, a.slot, len(a.ids), next_pos)
        assert self.grammars is not None, "a constrained request needs the engine's grammars"
        return Row.start(handle, a.adapter, a.slot, len(a.ids), next_pos,
                         self.grammars.start(fmt))

    def _advance(self, rows: list[Row], last: torch.Tensor) -> list[bool]:
        """Each running row moves one position on and takes its next token from its row of
        ``last`` (logits, rows first, then any joiners'); the finite flag of every row of
        ``last``."""
        finite = finite_rows(last)
        for i, row in enumerate(rows):
            row.next_pos += 1
            self._take(row, last[i], finite[i])
        return finite

    def _take(self, row: Row, logits: torch.Tensor, finite: bool) -> None:
        if self.on_logits is not None:
            self.on_logits(row.handle, logits)
        row.take(logits, finite)


def choice_rows(kv: BatchKV, group: Sequence[Admitted]) -> BatchKV:
    """``kv`` (one row per request of ``group``) with each request's row repeated once per
    choice (``Request.n``): the choices share the prompt's one prefill."""
    if all(not a.others for a in group):
        return kv
    return kv.select([i for i, a in enumerate(group) for _ in a.handles])


def prompt_records(logits: torch.Tensor, a: Admitted) -> tuple[TokenLogprob | None, ...]:
    """The prompt tokens' records from a full-logits prefill row ``logits`` (width, V),
    the prompt right-aligned in it: position p's logits give token p + 1's record."""
    ids, k = list(a.ids), a.handle.request.prompt_logprobs or 0
    width = logits.shape[0]
    chosen, values, top = token_logprobs(logits[width - len(ids):width - 1],
                                         torch.tensor(ids[1:]), k)
    return (None, *records(ids[1:], chosen, values, top))

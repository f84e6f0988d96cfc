"""Per-slot trainable token rows (PEFT's ``trainable_token_indices``) on an embedding, or
on an output head whose table it is.

A slot holds token ids ``(n,)`` and its own rows ``(n, dim)`` for them, which replace the
table's rows (``ops.tokens``). A ``TokenRows`` on an ``nn.Embedding`` owns the slots'
rows; when the model ties its LM head to that embedding, a second ``TokenRows`` on the
head (``tied_to`` the first) reads the same rows, so the logits of those vocabulary
columns come from the slot's rows. Tokens on slot -1, or on a slot without rows, see the
table.

Memory per slot: ``n * dim`` values (and ``n`` ids); a tied head holds nothing more.
Merging writes the slot's rows into the table (so into a tied head too) and keeps the
table's own rows aside; unmerging writes those back exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratree.errors import NonFiniteError
from loratree.layers.context import SlotContext
from loratree.ops.tokens import replace_columns, replace_lookup

__all__ = ["TokenRows"]

Override = tuple[Tensor, Tensor]
"""(ids ``(n,)``, rows ``(n, dim)``) to write over the table for some tokens."""


class TokenRows(nn.Module):
    """``base`` (an ``nn.Embedding``, or a Linear head ``(V, dim)``) with some rows
    replaced per slot. ``tied_to``: the embedding's ``TokenRows`` whose rows a tied head
    uses (it holds no rows of its own)."""

    def __init__(self, base: nn.Module, ctx: SlotContext, name: str = "",
                 tied_to: TokenRows | None = None) -> None:
        super().__init__()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(f"{name}: trainable tokens take an Embedding or a Linear head, "
                            f"not a {type(base).__name__}")
        self.base, self.ctx, self.module_name = base, ctx, name
        self.embedding = isinstance(base, nn.Embedding)
        self._source = [tied_to] if tied_to is not None else []  # a list: not a submodule
        if tied_to is None:
            self.token_rows = nn.ParameterDict()
            self.token_ids = nn.Module()  # buffers by slot, so .to() moves them
            self._merged: int | None = None
            self._original: Tensor | None = None
            """The table's own rows at the merged slot's ids, while they are replaced."""

    # -- slots ----------------------------------------------------------------------------
    @property
    def source(self) -> TokenRows:
        """The ``TokenRows`` that holds the rows (this one unless it is a tied head)."""
        return self._source[0] if self._source else self

    @property
    def merged(self) -> int | None:
        """The slot whose rows are written into the table, if any (a tied head's is its
        embedding's)."""
        return self.source._merged

    @property
    def tied(self) -> bool:
        return bool(self._source)

    def slots(self) -> tuple[int, ...]:
        return tuple(sorted(int(k) for k in self.source.token_rows))

    def has(self, slot: int) -> bool:
        return str(slot) in self.source.token_rows

    def ids_of(self, slot: int) -> Tensor:
        return self.source.token_ids._buffers[str(slot)]

    def rows_of(self, slot: int) -> Tensor:
        return self.source.token_rows[str(slot)]

    @property
    def vocab(self) -> int:
        return self.base.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.base.weight.shape[1]

    def add_rows(self, slot: int, ids: Tensor, rows: Tensor | None = None, *,
                 trainable: bool = True) -> None:
        """Give ``slot`` its own rows for ``ids``: a copy of ``rows`` when given, else of
        the table's own rows (so a fresh slot is an exact no-op, as PEFT starts)."""
        ids = self._checked_ids(slot, ids)
        if rows is None:
            rows = self.original_rows(ids)
        self._check_rows(slot, ids, rows)
        w = self.base.weight
        self.token_rows[str(slot)] = nn.Parameter(rows.detach().to(w).clone(),
                                                  requires_grad=trainable)
        self.token_ids.register_buffer(str(slot), ids.to(w.device), persistent=False)

    def set_rows(self, slot: int, ids: Tensor, rows: Tensor) -> None:
        """Point ``slot`` at ``rows`` (shared, not copied, when dtype and device match):
        the serving hot path, frozen."""
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        ids = self._checked_ids(slot, ids)
        self._check_rows(slot, ids, rows)
        w = self.base.weight
        self.token_rows[str(slot)] = nn.Parameter(rows.to(w), requires_grad=False)
        self.token_ids.register_buffer(str(slot), ids.to(w.device), persistent=False)

    def drop(self, slot: int) -> None:
        """``slot`` sees the table again."""
        if self.tied:
            return
        if self.merged == slot:
            raise RuntimeError(f"{self.module_name}: slot {slot} is merged; unmerge first")
        self.token_rows.pop(str(slot), None)
        self.token_ids._buffers.pop(str(slot), None)

    def nbytes(self, slot: int) -> int:
        """Bytes ``slot``'s rows take (0 without rows; a tied head adds none)."""
        if self.tied or not self.has(slot):
            return 0
        rows = self.rows_of(slot)
        return rows.numel() * rows.element_size()

    def parameters_of(self, slot: int) -> list[nn.Parameter]:
        return [] if self.tied or not self.has(slot) else [self.token_rows[str(slot)]]

    def original_rows(self, ids: Tensor) -> Tensor:
        """The table's own rows at ``ids``, whatever slot is merged."""
        src = self.source
        w = self.base.weight.detach()
        rows = w[ids.to(w.device)].clone()
        if src._merged is not None and src._original is not None:
            merged_ids = src.ids_of(src._merged)
            for j, i in enumerate(ids.tolist()):
                hit = (merged_ids == i).nonzero()
                if hit.numel():
                    rows[j] = src._original[int(hit[0, 0])]
        return rows

    def _checked_ids(self, slot: int, ids: Tensor | list[int] | tuple[int, ...]) -> Tensor:
        if self.tied:
            raise RuntimeError(f"{self.module_name}: a tied head takes its rows from "
                               f"{self.source.module_name}")
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if ids.numel() == 0:
            raise ValueError(f"{self.module_name}: slot {slot} needs at least one token id")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise ValueError(f"{self.module_name}: token ids for slot {slot} must be in "
                             f"[0, {self.vocab}), got {ids.tolist()[:8]}")
        if ids.unique().numel() != ids.numel():
            raise ValueError(f"{self.module_name}: token ids for slot {slot} repeat")
        return ids

    def _check_rows(self, slot: int, ids: Tensor, rows: Tensor) -> None:
        if tuple(rows.shape) != (ids.numel(), self.dim):
            raise ValueError(f"{self.module_name}: rows for slot {slot} must be "
                             f"({ids.numel()}, {self.dim}), got {tuple(rows.shape)}")

    # -- forward --------------------------------------------------------------------------
    def overrides(self, slot: int) -> list[Override]:
        """What to write over the table (as the base holds it now) for ``slot``'s tokens,
        in order: the table's own rows back where another slot is merged, then the
        slot's rows."""
        src = self.source
        if slot == src.merged:
            return []
        out: list[Override] = []
        if src.merged is not None and src._original is not None:
            out.append((src.ids_of(src.merged), src._original))
        if self.has(slot):
            out.append((self.ids_of(slot), self.rows_of(slot)))
        return out

    def _write_over(self, y: Tensor, x: Tensor, slot: int, tokens: Tensor | None) -> Tensor:
        for ids, rows in self.overrides(slot):
            if self.embedding:
                scale = getattr(self.base, "embed_scale", None)  # Gemma scales lookups
                rows = rows if scale is None else rows * scale.to(rows.dtype)
                y = replace_lookup(y, x, ids, rows, tokens)
            else:
                y = replace_columns(y, x, ids, rows, getattr(self.base, "bias", None), tokens)
        return y

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.ctx
        y = self.base(x)
        n = x.numel() if self.embedding else x.numel() // x.shape[-1]
        flat_x = x.reshape(n) if self.embedding else x.reshape(n, x.shape[-1])
        out = y.reshape(n, y.shape[-1])
        if ctx.index is None:
            return self._write_over(out, flat_x, ctx.active, None).view(y.shape)
        slots = [k for k in ctx.batch_slots() if self.overrides(k)]
        if not slots:
            return y
        tokens = ctx.head_slots(x.shape[0] if x.dim() > 1 else 1, n)
        for slot in slots:
            out = self._write_over(out, flat_x, slot, tokens == slot)
        return out.view(y.shape)

    # -- merge ----------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Write ``slot``'s rows into the table (a tied head's table too: it is the same
        tensor); a slot without rows leaves the table as it is. Refuses rows that are not
        finite. A tied head follows its embedding and does nothing here."""
        if self.tied or self.merged == slot:
            return
        if self.merged is not None:
            self.unmerge()
        if self.has(slot):
            ids, rows = self.ids_of(slot), self.rows_of(slot)
            if not torch.isfinite(rows).all():
                raise NonFiniteError(f"{self.module_name}: the token rows of slot {slot} are "
                                     "not finite; the table is unchanged")
            w = self.base.weight.data
            self._original = w[ids].clone()
            w.index_copy_(0, ids, rows.detach().to(w))
        self._merged = slot

    @torch.no_grad()
    def unmerge(self) -> None:
        """Give the table its own rows back (exactly)."""
        if self.tied:
            return
        if self._original is not None and self.merged is not None:
            self.base.weight.data.index_copy_(0, self.ids_of(self.merged), self._original)
        self._original = None
        self._merged = None

    def extra_repr(self) -> str:
        if self.tied:
            return f"tied_to={self.source.module_name!r}"
        return f"slots={list(self.slots())}, merged={self.merged}"

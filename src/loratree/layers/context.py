"""The slot context: which adapter slot each token uses, set once per forward.

One ``SlotContext`` is shared by every LoRA layer of a model. The trainer or engine sets it
before calling the model (``with ctx.use(index): model(...)``); layers read it. No model
code changes, so any ``transformers`` model works without a copy of its classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from loratree.ops.plan import Batch, Plan, describe
from loratree.ops.slots import Segments

__all__ = ["SlotContext"]


class SlotContext:
    """Per-forward slot selection shared by all layers of one model.

    Either every token uses ``active`` (a slot, or -1 for the base model alone), or
    ``index`` gives a slot per row ``(B,)`` or per token ``(B, T)``. Segments are computed
    once per distinct token count and reused by every layer in the forward pass.
    """

    def __init__(self, active: int = 0) -> None:
        self.active = active
        self.index: Tensor | None = None
        self.kept: Tensor | None = None
        """Flat positions of the tokens whose outputs the model keeps (transformers'
        ``logits_to_keep`` as a tensor: a packed step's last token of each request), set
        inside ``use`` by a caller whose head sees only those; ``head_slots`` reads it."""
        self.last_plan: Plan | None = None
        """The plan the last LoRA layer to run chose (``LoraModule.plan``): what a test
        asks to know which path a forward took."""
        self._memo: dict[tuple, Any] = {}
        """Values computed once per ``use`` / ``set`` (per forward): ``memo``."""

    @contextmanager
    def use(self, index: Tensor | int | None) -> Iterator[SlotContext]:
        """Select slots for the forward passes inside the block, then restore."""
        saved = (self.active, self.index, self._memo, self.kept)
        self.set(index)
        self.kept = None
        try:
            yield self
        finally:
            self.active, self.index, self._memo, self.kept = saved

    def set(self, index: Tensor | int | None) -> None:
        """Select one slot for all tokens (int, -1 = base), or per row/token (tensor)."""
        self._memo = {}
        if index is None or isinstance(index, int):
            self.active, self.index = (-1 if index is None else index), None
            return
        if not isinstance(index, Tensor) or index.dtype not in _INT_DTYPES:
            raise TypeError(f"slot index must be an int or an integer tensor, got {index!r}")
        if index.dim() not in (1, 2):
            raise ValueError(f"slot index must be (B,) or (B, T), got shape {tuple(index.shape)}")
        self.index = index.long()

    def segments(self, batch: int, n_tokens: int) -> Segments:
        """Segments for a layer input with ``batch`` rows flattened to ``n_tokens`` tokens."""
        return self.batch(batch, n_tokens).segments

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """A value computed once per ``use`` / ``set`` (per forward): ``make()`` the first
        time ``key`` is asked for. Layers share per-batch tensors (masks) this way."""
        value = self._memo.get(key)
        if value is None:
            value = make()
            self._memo[key] = value
        return value

    def batch_slots(self) -> tuple[int, ...]:
        """The distinct slots of this forward's index, sorted (cached per ``use``): one
        ``unique`` for the whole model, so a layer no slot of the batch touches is skipped
        at the cost of a set test."""
        assert self.index is not None
        return self.memo(("batch-slots",),
                         lambda: tuple(int(s) for s in self.index.unique().tolist()))

    def batch(self, batch: int, n_tokens: int) -> Batch:
        """What ``ops.plan.choose_plan`` needs of this forward's index, for a layer input
        of ``batch`` rows flattened to ``n_tokens`` tokens (cached per ``use``)."""
        def make() -> Batch:
            index = self.index
            assert index is not None
            per_row = index.dim() == 1 and index.shape[0] == batch and n_tokens % batch == 0
            return describe(self.token_slots(batch, n_tokens),
                            index.tolist() if per_row else None)

        return self.memo(("batch", batch, n_tokens), make)

    def token_slots(self, batch: int, n_tokens: int) -> Tensor:
        """The slot of each of the ``n_tokens`` flattened tokens ``(N,)`` (cached)."""
        key = (batch, n_tokens, "flat")
        return self.memo(key, lambda: self._flat_index(batch, n_tokens))

    def head_slots(self, batch: int, n_tokens: int) -> Tensor:
        """``token_slots`` for a module that may see only the kept tokens (an LM head under
        ``logits_to_keep``): a per-token index over more tokens than the input has is
        narrowed to ``kept``; a per-row index holds for any number of tokens per row."""
        index = self.index
        assert index is not None
        if index.dim() == 2 and index.numel() != n_tokens and self.kept is not None:
            if index.shape[0] != 1 or self.kept.numel() != n_tokens:
                raise ValueError(f"kept positions {tuple(self.kept.shape)} do not fit "
                                 f"{n_tokens} tokens of a {tuple(index.shape)} index")
            return index.reshape(-1)[self.kept.to(index.device)]
        return self.token_slots(batch, n_tokens)

    def _flat_index(self, batch: int, n_tokens: int) -> Tensor:
        index = self.index
        assert index is not None
        if index.shape[0] != batch:
            raise ValueError(f"slot index has {index.shape[0]} rows, the input has {batch}")
        if index.dim() == 1:
            if n_tokens % batch:
                raise ValueError(f"{n_tokens} tokens do not split into {batch} rows")
            return index.repeat_interleave(n_tokens // batch)
        if index.numel() != n_tokens:
            raise ValueError(
                f"per-token slot index {tuple(index.shape)} does not fit {n_tokens} tokens"
            )
        return index.reshape(-1)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

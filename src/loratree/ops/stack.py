"""A layer's adapter slots stacked for serving (vLLM's layout): one tensor for every A, one
for every B, the scale folded into B.

Row s of ``a_stack`` ``(S, R, in)`` holds slot s's A zero-padded to R rows, row s of
``b_stack`` ``(S, out, R)`` holds ``s_s B_s`` zero-padded to R columns, so
``b_stack[s] @ a_stack[s] = s_s B_s A_s`` whatever the slot's rank. A batch of slots then
reads its factors as a view of the stacks (or one ``index_select``), never restacking them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["stack_grown", "stack_put_", "stack_take"]


def stack_grown(a_stack: Tensor, b_stack: Tensor, n_slots: int,
                rank: int) -> tuple[Tensor, Tensor]:
    """The stacks with room for ``n_slots`` slots of rank up to ``rank`` (new tensors, the
    old rows copied, the new room zero); the stacks themselves when they have it already.

    Semantics: a'[s, :R] = a[s], b'[s, :, :R] = b[s], zeros elsewhere.
    Shape: a_stack (S, R, in), b_stack (S, out, R) -> (S', R', in), (S', out, R') with
        S' = max(S, n_slots), R' = max(R, rank)
    """
    s, r, n_in = a_stack.shape
    if n_slots <= s and rank <= r:
        return a_stack, b_stack
    s2, r2 = max(s, n_slots), max(r, rank)
    a = a_stack.new_zeros((s2, r2, n_in))
    b = b_stack.new_zeros((s2, b_stack.shape[1], r2))
    a[:s, :r] = a_stack
    b[:s, :, :r] = b_stack
    return a, b


@torch.no_grad()
def stack_put_(a_stack: Tensor, b_stack: Tensor, slot: int, a: Tensor, b: Tensor,
               scale: float) -> None:
    """Write one slot's factors into row ``slot`` of the stacks, in place.

    Semantics: a_stack[slot] = [A; 0], b_stack[slot] = [s B | 0].
    Shape: a_stack (S, R, in), b_stack (S, out, R), a (r, in), b (out, r) with r <= R
    """
    r = a.shape[0]
    a_stack[slot, :r].copy_(a)
    a_stack[slot, r:].zero_()
    b_stack[slot, :, :r].copy_(b * scale)
    b_stack[slot, :, r:].zero_()


def stack_take(a_stack: Tensor, b_stack: Tensor, slots: Sequence[int], rank: int,
               index: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The factors of ``slots``, in that order, ranks past ``rank`` dropped (zeros there).

    Consecutive slots (every slot of a full table, in order) are a view of the stacks;
    others one ``index_select`` (of ``index``, the slots as a tensor, when given).
    Semantics: (a_stack[slots, :rank], b_stack[slots, :, :rank]).
    Shape: (S, R, in), (S, out, R) -> (K, rank, in), (K, out, rank), K = len(slots)
    """
    a, b = a_stack[:, :rank], b_stack[:, :, :rank]
    lo, k = slots[0], len(slots)
    if slots[-1] - lo == k - 1 and list(slots) == list(range(lo, lo + k)):
        return a[lo:lo + k], b[lo:lo + k]
    if index is None:
        index = torch.tensor(slots, dtype=torch.long, device=a_stack.device)
    return a.index_select(0, index), b.index_select(0, index)

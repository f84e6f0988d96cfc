"""Which admitted requests share a prefill forward.

One forward prefills every admitted request, except on a model with sliding-window
layers: there a prefix adapter's row shares its forward only with prefix rows of its prompt
length. A batched prefill lays a row out as [prefix | padding | prompt], and a window counts
columns, so padding between a prefix and its prompt would shift it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["prefill_groups"]


def prefill_groups(prompt_lens: Sequence[int], prefix: Sequence[bool],
                   windowed: bool) -> list[list[int]]:
    """The requests (indices, in order) of each prefill forward: all together, or on a
    windowed model the non-prefix rows together and the prefix rows by prompt length."""
    if not windowed:
        return [list(range(len(prompt_lens)))]
    parts: dict[int, list[int]] = {}
    for i, (n, is_prefix) in enumerate(zip(prompt_lens, prefix, strict=True)):
        parts.setdefault(n if is_prefix else -1, []).append(i)
    return list(parts.values())

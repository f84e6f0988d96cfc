"""Choosing which modules to adapt: names, globs, regexes, module types or ``all-linear``."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from loratree.errors import TargetError
from loratree.layers import FullCopy, LoraModule, NF4Linear, ParamHost, PrefixBank, TokenRows

__all__ = ["ADAPTABLE", "adaptable_modules", "find_targets", "matches", "pattern_value"]

try:  # transformers' GPT-2 style linear: weight (in, out), y = x @ W + b
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None

ADAPTABLE: tuple[type[nn.Module], ...] = tuple(
    t for t in (nn.Linear, NF4Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D) if t is not None
)
_LINEAR = tuple(t for t in (nn.Linear, NF4Linear, Conv1D) if t is not None)


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can wrap, by dotted name; already-wrapped ones give their base."""
    found: dict[str, nn.Module] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, PrefixBank | FullCopy | ParamHost | TokenRows):  # prefix
            # encoders, full copies, adapted parameters, token rows
            skip.append(name + ".")
        elif isinstance(module, LoraModule):
            found[name] = module.base
            skip.append(name + ".")
        elif isinstance(module, ADAPTABLE):
            found[name] = module
    return found


def matches(pattern: str, name: str, module: nn.Module, head: nn.Module | None) -> bool:
    """Whether one target pattern selects the module called ``name``."""
    if pattern == "all-linear":
        return isinstance(module, _LINEAR) and module is not head
    if pattern.startswith("type:"):
        return type(module).__name__ == pattern[5:]
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(
    model: nn.Module, targets: tuple[str, ...], exclude: tuple[str, ...] = ()
) -> dict[str, nn.Module]:
    """The adaptable modules the patterns select, in model order.

    Raises ``TargetError`` naming every pattern that selects nothing adaptable.
    """
    head = _output_head(model)
    candidates = adaptable_modules(model)
    chosen: dict[str, nn.Module] = {}
    unused = []
    for pattern in targets:
        hits = [n for n, m in candidates.items() if matches(pattern, n, m, head)]
        if not hits:
            unused.append(pattern)
        chosen.update((n, candidates[n]) for n in hits)
    if unused:
        raise TargetError(
            f"target pattern(s) {unused} match no adaptable module "
            f"(adaptable: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in candidates}))})"
        )
    dropped = {n for n, m in chosen.items() for p in exclude if matches(p, n, m, head)}
    order = list(candidates)
    return {n: chosen[n] for n in sorted(chosen, key=order.index) if n not in dropped}


def pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a name suffix as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None

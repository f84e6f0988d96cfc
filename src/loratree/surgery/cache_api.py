"""Which keyword a model's forward takes its key/value cache by, and whether it takes
another keyword at all (``forward_takes``).

transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name still works with
a deprecation warning until 5.40; ``generate`` passes the new one). Code that hands a
cache to a model or reads one from a call's keyword arguments asks here, so it works with
both spellings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["CACHE_KWARGS", "cache_kwarg", "forward_takes", "pop_cache"]

CACHE_KWARGS = ("cache", "past_key_values")


@functools.cache
def _kwarg_for(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg(model: nn.Module) -> str:
    """``"cache"`` when ``model.forward`` takes that keyword, else ``"past_key_values"``."""
    return _kwarg_for(type(model))


@functools.cache
def _params_of(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether the forward of ``model``, under any DDP (``.module``) or PEFT
    (``get_base_model``) wrapper, has a parameter ``name``."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    inner = get_base() if callable(get_base) else inner
    return name in _params_of(type(inner))


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments under either name; None if absent.

    Where both are given (callers mixing the names), the new name wins, as in transformers.
    """
    old = kwargs.pop("past_key_values", None)
    new = kwargs.pop("cache", None)
    return new if new is not None else old

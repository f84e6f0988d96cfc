"""What differs between the transformers versions loratree supports, asked in one place.

The key/value cache's keyword: transformers 5.24 renamed a model forward's
``past_key_values`` to ``cache`` (and the outputs' field with it). The old name still works
there, with a deprecation warning, until 5.40; releases before 5.24 know only the old one.
Every call site that hands a cache to a model, reads one from a model's output, or takes
one out of a forward's keyword arguments goes through here, so no call site spells either
name and each call uses the name the installed transformers expects:

- ``cache_kwargs(model, cache)``: the keyword argument ``{name: cache}`` for ``model``'s
  forward, the name read once per model class from its forward's signature;
- ``output_cache(out)``: the cache a forward returned, read once per output class from its
  fields;
- ``pop_cache(kwargs)``: the cache in a forward's keyword arguments under either name (a
  forward pre-hook sees whatever its caller passed).

``forward_takes`` answers the same question for other keywords (``logits_to_keep``,
``position_ids``) through any DDP or PEFT wrapper.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any

from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_KWARGS", "INSTALLED", "cache_kwarg", "cache_kwargs", "forward_takes",
           "output_cache", "pop_cache"]

NEW, OLD = "cache", "past_key_values"
CACHE_KWARGS = (NEW, OLD)
"""Both names, the current one first."""


def _inner(model: nn.Module) -> nn.Module:
    """The module whose forward does the work, under any DDP (``.module``) or PEFT
    (``get_base_model``) wrapper (whose own forwards pass keywords on as ``**kwargs``)."""
    inner = getattr(model, "module", model)
    get_base = getattr(inner, "get_base_model", None)
    return get_base() if callable(get_base) else inner


@functools.cache
def _params_of(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_takes(model: nn.Module, name: str) -> bool:
    """Whether the forward of ``model``, under any DDP or PEFT wrapper, has a parameter
    ``name``."""
    return name in _params_of(type(_inner(model)))


@functools.cache
def _field_for(cls: type) -> str:
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
    return NEW if NEW in names else OLD


INSTALLED = _field_for(CausalLMOutputWithPast)
"""The name the installed transformers uses (outputs and forwards were renamed together)."""


@functools.cache
def _kwarg_for(cls: type) -> str:
    # transformers >= 5.24 lists only ``cache`` (its deprecation wrapper keeps the
    # signature), older ones ``past_key_values``; a forward listing neither (``**kwargs``
    # only, passing them on) gets the installed transformers' name
    params = _params_of(cls)
    return NEW if NEW in params else OLD if OLD in params else INSTALLED


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model``'s forward takes its key/value cache by: ``"cache"`` where it
    has that parameter, else ``"past_key_values"``."""
    return _kwarg_for(type(_inner(model)))


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword argument ``model``'s forward takes it by:
    ``model(input_ids=..., **cache_kwargs(model, cache))``."""
    return {cache_kwarg(model): cache}


def output_cache(out: Any) -> Any:
    """The key/value cache a forward returned (``out.cache`` on transformers >= 5.24,
    ``out.past_key_values`` before; reading the old name there logs a deprecation)."""
    return getattr(out, _field_for(type(out)))


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a call's keyword arguments under either name; None if absent.

    Where both are given (callers mixing the names), the new name wins, as in transformers.
    """
    old = kwargs.pop(OLD, None)
    new = kwargs.pop(NEW, None)
    return new if new is not None else old

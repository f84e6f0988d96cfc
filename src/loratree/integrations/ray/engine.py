"""A replica's engine: the base model (a path, the embedded default, or a factory), the
store and plain adapter folders, its own RAM cache and slots; the same parts ``loratree
serve`` builds."""

from __future__ import annotations

import importlib

from loratree.models import load_base
from loratree.serve import Engine
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache
from loratree.tree.store_source import serving_sources

from .options import RayServeOptions

__all__ = ["adapters_that_fit", "build_engine"]


def build_engine(options: RayServeOptions) -> Engine:
    if options.model_factory is not None:
        module, _, function = options.model_factory.partition(":")
        model, tokenizer = getattr(importlib.import_module(module), function)()
    else:
        model, tokenizer = load_base(options.model)
    if tokenizer is None:
        raise ValueError("serving needs a tokenizer; the model directory has none")
    source = serving_sources(options.store, tuple(options.adapters_dirs))
    cache = AdapterCache(source, int(options.cache_mb * 2**20))
    table = SlotTable(model, cache, n_slots=options.slots, max_rank=options.max_rank)
    return Engine(model, tokenizer, table, max_batch=options.max_batch,
                  cpu_tuning=options.cpu_tuning)


def adapters_that_fit(cache: AdapterCache) -> int:
    """How many of the served largest adapters the cache's budget holds (at least 1): the
    number of adapters a replica tells Ray's router it holds, so the router's LRU and the
    cache's LRU drop the same adapter."""
    sizes = [info.size for info in cache.source.list()]
    return max(1, cache.budget // max(sizes)) if sizes else 1

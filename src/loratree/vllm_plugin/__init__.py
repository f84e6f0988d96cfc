"""loratree stores served by vLLM: a LoRA resolver plugin, and a flat export.

**The plugin.** Installed with loratree, it is registered in vLLM's ``vllm.general_plugins``
entry-point group and does nothing until vLLM loads it and ``LORATREE_VLLM_STORE`` names
a store::

    LORATREE_VLLM_STORE=adapters VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 \\
        vllm serve BASE --enable-lora --max-lora-rank 64

A request's ``model`` (a store name or tree path) is then composed and materialised once
per content version under ``LORATREE_VLLM_CACHE`` (default: the loratree cache's
``vllm/``) and handed to vLLM (``cache``, ``resolver``). What vLLM cannot serve is refused
with the reason (``servable``).

**The export.** ``export_store`` writes every adapter of a store as one flat directory
that vLLM's filesystem resolver, ``--lora-modules`` and Ray Serve LLM read as is.

Only ``resolver`` imports vLLM, and only ``register`` imports ``resolver``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from loratree.adapters import AdapterStore
from loratree.adapters.store import OBJECTS
from loratree.models.embedded import cache_root
from loratree.vllm_plugin.cache import MANIFEST, Materialised, MaterialisedCache
from loratree.vllm_plugin.export import ExportReport, export_store
from loratree.vllm_plugin.prune import PruneReport, prune_cache
from loratree.vllm_plugin.servable import (
    VLLM_MAX_LORA_RANKS,
    DamagedEntryError,
    NotLoraError,
    RefusedError,
    StaleNodeError,
    UnsupportedFeatureError,
    for_vllm,
    vllm_max_lora_rank,
)

__all__ = [
    "CACHE_ENV",
    "MANIFEST",
    "STORE_ENV",
    "VLLM_MAX_LORA_RANKS",
    "DamagedEntryError",
    "ExportReport",
    "Materialised",
    "MaterialisedCache",
    "NotLoraError",
    "PruneReport",
    "RefusedError",
    "StaleNodeError",
    "UnsupportedFeatureError",
    "cache_dir",
    "cache_from_env",
    "existing_store",
    "export_store",
    "for_vllm",
    "prune_cache",
    "register",
    "vllm_max_lora_rank",
]

log = logging.getLogger(__name__)

STORE_ENV = "LORATREE_VLLM_STORE"
"""The store the plugin serves; unset, the plugin registers nothing."""
CACHE_ENV = "LORATREE_VLLM_CACHE"
"""Where materialised adapters go (default: ``<loratree cache>/vllm``)."""


def cache_from_env(environ: dict[str, str] | None = None) -> MaterialisedCache | None:
    """The cache the environment configures, or None when ``LORATREE_VLLM_STORE`` is unset.

    Raises:
        ValueError: ``LORATREE_VLLM_STORE`` is set but is not a store directory.
    """
    env = os.environ if environ is None else environ
    store = env.get(STORE_ENV)
    if not store:
        return None
    return MaterialisedCache(existing_store(store, f"{STORE_ENV}={store!r}"), cache_dir(env))


def existing_store(path: str | Path, label: str | None = None) -> AdapterStore:
    """The store at ``path``; ``ValueError`` when there is none (``AdapterStore()`` would
    create an empty one)."""
    root = Path(path).expanduser()
    if not (root / OBJECTS).is_dir():
        raise ValueError(f"{label or repr(str(path))} is not a loratree store (no {OBJECTS} "
                         "directory); create it with `loratree store add`")
    return AdapterStore(root)


def cache_dir(environ: dict[str, str] | None = None) -> Path:
    """Where materialised adapters go: ``LORATREE_VLLM_CACHE``, else the loratree cache's
    ``vllm/``."""
    env = os.environ if environ is None else environ
    return Path(env.get(CACHE_ENV) or str(cache_root() / "vllm")).expanduser()


def register() -> None:
    """vLLM's entry point (``vllm.general_plugins``): add the store resolver when
    ``LORATREE_VLLM_STORE`` is set. vLLM calls it in each of its processes, possibly more
    than once; registering again replaces the resolver with an equal one."""
    cache = cache_from_env()
    if cache is None:
        log.debug("%s is unset: the loratree resolver is not registered", STORE_ENV)
        return
    from loratree.vllm_plugin.resolver import register_resolver

    register_resolver(cache)
    log.info("loratree resolver: serving store %s (cache %s)", cache.store.root, cache.root)

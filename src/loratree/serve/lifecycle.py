"""vLLM's runtime adapter lifecycle: ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, with vLLM's request bodies, answers and status codes.

Registered only when the server allows it (``ServerConfig.allow_runtime_lora_updating``,
``loratree serve --allow-runtime-lora-updating`` or ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true``);
otherwise the routes do not exist (404), as in vLLM.

In loratree the store is the source of truth, so both routes change the store:

- load validates a private copy of the files in full (what ``loratree store add`` checks)
  and checks that the adapter fits the served model and the slots (``SlotTable.check``;
  a tree node as served: composed with its parent's path, whose rank must fit too), then
  adds it with ``AdapterStore.add``: one atomic swap of the name's link. Nothing is
  served before every check passed. ``load_inplace`` replaces a served adapter; requests
  running on it finish on the version they started with (their slot keeps it), the next
  requests get the new one.
- unload removes the name from the store: new requests get 404 at once, requests running
  on it finish (their slot and RAM entry outlive the name until they end).

Success is 200 with vLLM's plain-text message; errors have vLLM's body:
``{"error": {"message", "type", "param", "code": <status>}}`` (400 bad or missing field,
an adapter that does not read or does not fit, a name that exists without
``load_inplace``; 404 no adapter at ``lora_path``, or unloading an unknown name; 409
unloading a tree node that has children).
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict

from loratree.adapters.node_files import read_record
from loratree.adapters.peft_format import CONFIG_NAME, read_config
from loratree.adapters.prefix_files import PrefixFile
from loratree.adapters.source import AdapterRead, parse_adapter
from loratree.adapters.store import FILES, AdapterStore, check_name
from loratree.errors import (
    AdapterInUseError,
    AdapterNameError,
    AdapterNotFoundError,
    UnsafeFormatError,
)

if TYPE_CHECKING:
    from loratree.serve.http import ServerState

__all__ = ["ENV_FLAG", "LoadLoraAdapter", "UnloadLoraAdapter", "lifecycle_routes"]

logger = logging.getLogger(__name__)

ENV_FLAG = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
"""vLLM's switch for these routes; ``loratree serve`` honours it too."""


class LoadLoraAdapter(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest`` (fields loratree does not use are ignored)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str | None = None
    lora_path: str | None = None
    load_inplace: bool = False


class UnloadLoraAdapter(BaseModel):
    """vLLM's ``UnloadLoRAAdapterRequest``; ``lora_int_id`` is accepted and unused (the
    name identifies an adapter)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str | None = None
    lora_int_id: int | None = None


def lifecycle_routes(app: FastAPI, state: ServerState) -> None:
    store = state.store
    if store is None:
        raise ValueError("runtime LoRA updating needs a store (--store): loaded adapters "
                         "are added to it")
    lock = threading.Lock()  # one change at a time: "exists?" and the add stay together

    @app.post("/v1/load_lora_adapter")
    def load_lora_adapter(body: LoadLoraAdapter) -> Response:
        with lock:
            return _load(state, store, body)

    @app.post("/v1/unload_lora_adapter")
    def unload_lora_adapter(body: UnloadLoraAdapter) -> Response:
        with lock:
            return _unload(state, store, body)


def _load(state: ServerState, store: AdapterStore, body: LoadLoraAdapter) -> Response:
    name, path = body.lora_name, body.lora_path
    if not name or not path:
        return _error(400, "Both 'lora_name' and 'lora_path' must be provided.",
                      "InvalidUserInput")
    try:
        check_name(name)
    except AdapterNameError as e:
        return _error(400, state.clean(str(e)), "InvalidUserInput")
    if not body.load_inplace and name in state.sources:
        return _error(400, f"The lora adapter '{name}' has already been loaded. If you want "
                      "to load the adapter in place, set 'load_inplace' to True.",
                      "InvalidUserInput")
    source = Path(path)
    if not (source / CONFIG_NAME).is_file():
        return _error(404, state.clean(f"Loading lora {name} failed: No adapter found for "
                                       f"{path}"), "NotFoundError")
    staging = store.objects / f".tmp-{uuid.uuid4().hex}"
    try:
        _stage(source, staging)
        adapter = parse_adapter(staging, read_config(staging))
        record = read_record(staging)  # a tree node: checked as served, its path composed
        parent = record.parent if record is not None else None
        read = (AdapterRead(name, "staged", staging, prefix=adapter, parent=parent)
                if isinstance(adapter, PrefixFile)
                else AdapterRead(name, "staged", staging, lora=adapter, parent=parent))
        state.engine.table.check(state.engine.table.cache.assemble(read))
        store.add(name, staging)
    except (ValueError, OSError, AdapterNotFoundError) as e:  # typed input errors
        message = (e.strerror or type(e).__name__) if isinstance(e, OSError) else str(e)
        return _error(400, state.clean(f"Loading lora {name} failed: {type(e).__name__}: "
                                       f"{message}"), "BadRequestError")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    try:
        state.engine.table.cache.get(name)  # preload, as vLLM does; a miss later is fine
    except Exception as e:  # e.g. the cache is full of running adapters now
        logger.info("preloading %s: %s", name, e)
    logger.info("loaded LoRA adapter %r into the store%s", name,
                " in place" if body.load_inplace else "")
    return Response(f"Success: LoRA adapter '{name}' added successfully.", 200,
                    media_type="text/plain")


def _unload(state: ServerState, store: AdapterStore, body: UnloadLoraAdapter) -> Response:
    name = body.lora_name
    if not name:
        return _error(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                      "InvalidUserInput")
    if name not in store:
        if name in state.sources:
            return _error(400, f"The lora adapter '{name}' is served read-only from an "
                          "adapters directory; remove its directory to stop serving it.",
                          "InvalidUserInput")
        return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    try:
        store.remove(name)
    except AdapterInUseError as e:
        return _error(409, state.clean(str(e)), "ConflictError")
    try:  # free its RAM now if nothing runs on it; else the LRU frees it later
        state.engine.table.cache.evict(name)
    except AdapterInUseError:
        pass
    logger.info("unloaded LoRA adapter %r (removed from the store)", name)
    return Response(f"Success: LoRA adapter '{name}' removed successfully.", 200,
                    media_type="text/plain")


def _stage(source: Path, staging: Path) -> None:
    """A private copy of the adapter's files (regular files only, never a link's target),
    so what is checked is exactly what is added, whatever happens at ``source`` meanwhile."""
    staging.mkdir()
    for f in FILES:
        try:
            mode = os.lstat(source / f).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISREG(mode):
            shutil.copyfile(source / f, staging / f)
        else:
            raise UnsafeFormatError(f"{f} in lora_path is not a regular file (a link?)")


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """vLLM's error body: OpenAI's shape with the status as ``code``."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status_code=status)

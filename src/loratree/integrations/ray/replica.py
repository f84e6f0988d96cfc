"""The replica deployment: one loratree engine behind loratree's own HTTP layer, with the
adapters it holds registered with Ray Serve's model multiplexing.

A request arrives with the adapter's name as its multiplexed model id. Before the request
runs, the replica loads that adapter into its RAM cache through a ``serve.multiplexed``
loader, so Ray's router learns that this replica holds it and sends the adapter's next
requests here while the replica has room. The loader keeps at most as many adapters as the
cache's budget fits (``adapters_that_fit``); the one Ray unloads (its least recently used)
is evicted from the cache too, unless a running request still uses it. Loads and evictions
go to the ``LoadLedger``.

The request itself is the unchanged HTTP request, run through ``create_app``'s app in this
process (``call_asgi``), so the replicas answer exactly what ``loratree serve`` answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable

from ray import serve
from ray.serve.handle import DeploymentHandle

from loratree.errors import AdapterInUseError
from loratree.serve.http import create_app

from .asgi_call import HttpCall, ResponseStart, call_asgi
from .engine import adapters_that_fit, build_engine
from .options import RayServeOptions

__all__ = ["REPLICA_HEADER", "LoraTreeReplica"]

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-loratree-replica"
"""Response header naming the replica that answered."""


class _Held:
    """An adapter Ray's router counts as on this replica; Ray calls ``__del__`` when it
    unloads it (and Python may again when it collects it: only the first call acts)."""

    def __init__(self, adapter: str, on_unload: Callable[[str], None]) -> None:
        self.adapter, self._on_unload, self._done = adapter, on_unload, False

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._on_unload(self.adapter)


class LoraTreeReplica:
    async def __init__(self, options: RayServeOptions, ledger: DeploymentHandle) -> None:
        self.engine = build_engine(options)
        self.cache = self.engine.table.cache
        self.app = create_app(self.engine, options.server)
        self.engine.start()
        self.id = serve.get_replica_context().replica_id.unique_id
        self.ledger = ledger
        self.held: set[str] = set()
        self._loop = asyncio.get_running_loop()
        self.max_adapters = adapters_that_fit(self.cache)

        async def hold_adapter(adapter: str) -> _Held:
            return await self._load(adapter)

        self._hold = serve.multiplexed(max_num_models_per_replica=self.max_adapters)(
            hold_adapter)
        await ledger.started.remote(self.id, os.getpid())
        logger.info("replica %s (pid %d) holds up to %d adapters", self.id, os.getpid(),
                    self.max_adapters)

    async def forward(self, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
        """The response to ``call``: a ``ResponseStart`` (naming this replica), then the
        body's chunks as the app produces them."""
        adapter = serve.get_multiplexed_model_id()
        if adapter and adapter in self.cache.source:
            try:
                await self._hold(adapter)
            except Exception:  # the app answers with the adapter's own error (404, 422)
                logger.warning("loading %r failed", adapter, exc_info=True)
        async for item in call_asgi(self.app, call):
            if isinstance(item, ResponseStart):
                item = ResponseStart(item.status, (*item.headers,
                                                   (REPLICA_HEADER.encode(), self.id.encode())))
            yield item

    def check_health(self) -> None:
        """Ray restarts a replica whose engine loop has died."""
        if not self.engine.alive:
            raise RuntimeError(f"the engine loop died: {self.engine.last_error}")

    def __del__(self) -> None:
        self.engine.close()

    # -- the multiplexed loader's two ends -----------------------------------------------
    async def _load(self, adapter: str) -> _Held:
        await asyncio.to_thread(self.cache.get, adapter)
        self.held.add(adapter)
        await self._report(self.ledger.loaded, adapter)
        return _Held(adapter, self._unload)

    def _unload(self, adapter: str) -> None:
        """Runs on a worker thread of Ray's (or the collector's)."""
        self.held.discard(adapter)
        try:
            self.cache.evict(adapter)
        except AdapterInUseError:  # a running request still reads it: the cache's LRU
            pass                   # drops it once it is free and room is needed
        if not self._loop.is_closed():  # not at interpreter exit
            asyncio.run_coroutine_threadsafe(self._report(self.ledger.evicted, adapter),
                                             self._loop)

    async def _report(self, method: DeploymentHandle, adapter: str) -> None:
        """Tell the ledger; a ledger that is down costs the counts, never the request."""
        try:
            await method.remote(self.id, adapter, sorted(self.held))
        except Exception:
            logger.warning("the load ledger missed %r on %s", adapter, self.id, exc_info=True)

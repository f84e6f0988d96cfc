"""One HTTP request carried as data to an ASGI app in this process, its response back as
a start record and body chunks: how a replica runs loratree's own HTTP layer unchanged.

The request crosses a process boundary (the ingress to a replica) as an ``HttpCall``; the
replica drives the app with it and yields a ``ResponseStart`` then the body's chunks as the
app sends them, so a server-sent event stream stays a stream. Closing the generator early
(the client went away) tells the app the client disconnected and cancels it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["HttpCall", "ResponseStart", "call_asgi"]

Asgi = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]],
                Awaitable[None]]


@dataclass(frozen=True)
class HttpCall:
    method: str
    path: str
    query: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None


@dataclass(frozen=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]

    def header(self, name: str) -> str | None:
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in self.headers if k.lower() == key), None)


def _scope(call: HttpCall) -> dict[str, Any]:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": call.method, "scheme": "http",
            "path": call.path, "raw_path": call.path.encode(), "query_string": call.query,
            "root_path": "", "headers": list(call.headers), "client": call.client,
            "server": ("127.0.0.1", 0)}


async def call_asgi(app: Asgi, call: HttpCall) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``call`` through ``app``: yields one ``ResponseStart``, then non-empty chunks."""
    sent: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_read = False

    async def receive() -> dict:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await sent.put(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            await sent.put(None)

    task = asyncio.create_task(run())
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], tuple(
                    (bytes(k), bytes(v)) for k, v in message.get("headers", ())))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        await task  # the app's own exception, if it raised one
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

"""The server's ASGI middleware: body size limit, API key, request counting.

Pure ASGI (not Starlette's BaseHTTPMiddleware), so streamed responses pass through
untouched and a body over the limit is refused before it is read to the end.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from loratree.serve.openai_api import error_body

__all__ = ["ApiKey", "BodyLimit", "CountRequests"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


async def _send_error(send: Send, status: int, message: str, kind: str,
                      code: str | None = None) -> None:
    body = json.dumps(error_body(message, kind, None, code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``limit`` bytes, by Content-Length or as it streams in."""

    def __init__(self, app: Callable, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _send_error(send, 413, f"the body is over {self.limit} bytes",
                              "invalid_request_error", "body_too_large")
            return
        seen = 0
        started = False

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, watch)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, f"the body is over {self.limit} bytes",
                                  "invalid_request_error", "body_too_large")


class ApiKey:
    """Every route but ``open_paths`` (exact) and the paths under ``open_prefixes`` needs
    ``Authorization: Bearer <key>``, compared in constant time."""

    def __init__(self, app: Callable, key: str, open_paths: tuple[str, ...] = (),
                 open_prefixes: tuple[str, ...] = ()) -> None:
        self.app, self.key, self.open_paths = app, key.encode(), open_paths
        self.open_prefixes = open_prefixes

    def _open(self, path: str) -> bool:
        return path in self.open_paths or (
            path.startswith(self.open_prefixes) and ".." not in path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self._open(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            token = given[7:] if given[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                await _send_error(send, 401, "missing or wrong API key",
                                  "authentication_error", "invalid_api_key")
                return
        await self.app(scope, receive, send)


class CountRequests:
    """Count every HTTP request once, by route and the status it got: ``count(route,
    status)``; a path outside ``routes`` counts as "/admin" or "other"."""

    def __init__(self, app: Callable, count: Callable[[str, str], None],
                 routes: tuple[str, ...]) -> None:
        self.app, self.count, self.routes = app, count, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        path = scope["path"]
        route = (path if path in self.routes else "/admin" if path.startswith("/admin/")
                 else "other")

        async def watch(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.count(route, str(status))

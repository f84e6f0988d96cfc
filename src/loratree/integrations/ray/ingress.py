"""The ingress deployment: every HTTP request, forwarded to a replica chosen by adapter.

It reads ``model`` from a JSON body and sends the request to ``LoraTreeReplica`` with that
name as the multiplexed model id (the base model and ``auto`` go without one, to any
replica), then relays the replica's status, headers and body; a server-sent event stream
is relayed chunk by chunk. ``GET /ray/replicas`` answers the ``LoadLedger``'s snapshot.

A replica that dies (its process killed, its node lost) fails only the requests it was
running: before any byte of the response, with 503 and ``Retry-After`` in OpenAI's error
shape (code ``replica_died``); in the middle of a stream, with that error as the stream's
last event. Ray starts a new replica in its place.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator

from ray.exceptions import RayActorError
from ray.serve.exceptions import ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loratree.serve.openai_api import error_body
from loratree.serve.requests import AUTO
from loratree.serve.slot_table import BASE

from .asgi_call import HttpCall, ResponseStart
from .options import RayServeOptions

__all__ = ["LEDGER_PATH", "Ingress"]

logger = logging.getLogger(__name__)

LEDGER_PATH = "/ray/replicas"
_DIED = (RayActorError, ReplicaUnavailableError)
"""How a request whose replica died surfaces through a handle."""
_HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}


class Ingress:
    def __init__(self, replicas: DeploymentHandle, ledger: DeploymentHandle,
                 options: RayServeOptions) -> None:
        self.replicas = replicas.options(stream=True)
        self.ledger = ledger
        self.config = options.server
        self.unrouted = {options.server.base_name, BASE, AUTO}

    async def __call__(self, request: Request) -> Response:
        if request.url.path == LEDGER_PATH:
            return await self._ledger(request)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.config.max_body_bytes:
                return _error(413, f"the body exceeds {self.config.max_body_bytes} bytes",
                              "invalid_request_error", "body_too_large")
        call = HttpCall(request.method, request.url.path, request.url.query.encode(),
                        tuple(request.headers.raw), body,
                        (request.client.host, request.client.port) if request.client else None)
        stream = self.replicas.options(multiplexed_model_id=self._adapter(body)
                                       ).forward.remote(call)
        try:
            start = await stream.__anext__()
            assert isinstance(start, ResponseStart), "a replica answers its start first"
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers
                       if k.lower() not in _HOP_HEADERS}
            if (start.header("content-type") or "").startswith("text/event-stream"):
                return StreamingResponse(_relay(stream), status_code=start.status,
                                         headers=headers)
            content = b"".join([chunk async for chunk in stream])
        except _DIED:
            logger.warning("a replica died with a request on it", exc_info=True)
            return _error(503, "the replica serving this request died; retry",
                          "server_error", "replica_died", self.config.retry_after_s)
        return Response(content, status_code=start.status, headers=headers)

    def _adapter(self, body: bytes) -> str:
        """The multiplexed model id: the adapter ``model`` names, or "" for none."""
        try:
            model = json.loads(body).get("model") if body else None
        except (ValueError, AttributeError):
            return ""
        return model if isinstance(model, str) and model not in self.unrouted else ""

    async def _ledger(self, request: Request) -> Response:
        key = self.config.api_key
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return _error(401, "a valid API key is required", "authentication_error",
                          "invalid_api_key")
        return JSONResponse(await self.ledger.snapshot.remote())


async def _relay(stream: DeploymentResponseGenerator) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in stream:
            yield chunk
        finished = True
    except _DIED:
        logger.warning("a replica died in the middle of a stream", exc_info=True)
        body = error_body("the replica serving this request died; retry", "server_error",
                          None, "replica_died")
        yield f"data: {json.dumps(body)}\n\n".encode()
        finished = True
    finally:
        if not finished:  # the client went away: the replica cancels the request
            stream.cancel()


def _error(status: int, message: str, kind: str, code: str,
           retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse(error_body(message, kind, None, code), status_code=status,
                        headers=headers)

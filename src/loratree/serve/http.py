"""The OpenAI-compatible HTTP layer over the engine (FastAPI).

Thin by design: a route validates the body (``openai_api``), resolves ``model`` to an
adapter (the base model's name or ``__base__``, a store name, or ``auto``), encodes the
prompt, admits the request if there is room, hands it to the engine, and turns the
engine's ``Completion`` (or its stream of text) into OpenAI's JSON or server-sent events.

Status codes: 400 bad parameter (named in ``error.param``), 401 missing or wrong API key,
404 unknown adapter or route, 413 body over the limit, 422 an adapter that cannot be used
(malformed file, rank above the slots', non-finite output; code ``adapter_damaged``: its
files in the store changed after it was added, and the message names the entry and the
fix), 429 queue full (with ``Retry-After``), 503 draining, 504 past the request deadline,
500 anything else. Error messages never carry a stack trace or a filesystem path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from loratree.adapters.folder_source import plain_dir
from loratree.adapters.store import check_name
from loratree.errors import (
    AdapterFileError,
    AdapterInUseError,
    AdapterNameError,
    AdapterNotFoundError,
    CacheFullError,
    DamagedAdapterError,
    NonFiniteError,
    RankTooLargeError,
    ResponseFormatError,
    TargetError,
)
from loratree.models.chat import Message, encode_prompt
from loratree.serve import webapp as web
from loratree.serve.embeddings import EmbeddingInputError
from loratree.serve.engine import Engine
from loratree.serve.lifecycle import lifecycle_routes
from loratree.serve.metrics import CONTENT_TYPE, Metrics
from loratree.serve.middleware import ApiKey, BodyLimit, CountRequests
from loratree.serve.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Unsupported,
    chunk_body,
    completion_body,
    embedding_body,
    error_body,
    new_id,
)
from loratree.serve.requests import AUTO, Completion, FinishReason, Handle, Request
from loratree.serve.response_format import to_constraint
from loratree.serve.slot_table import BASE

__all__ = ["ServerConfig", "ServerState", "create_app"]

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health", "/ready")
"""Routes that need no API key."""
_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
           "/metrics", "/v1/embeddings", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
_PATH = re.compile(r"(?<![\w.])/(?:[\w.\-]+/)*[\w.\-]+")


@dataclass(frozen=True)
class ServerConfig:
    base_name: str = "base"
    """The ``model`` id of the bare base model (``__base__`` is accepted too)."""
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 64
    """Generation requests admitted at once (running + waiting); more get 429."""
    request_timeout_s: float = 300.0
    default_max_tokens: int = 256
    """Chat completions without ``max_tokens``: at most this many (and what fits)."""
    retry_after_s: int = 1
    admin: bool = False
    """Enable ``POST /admin/adapters/{name}/load`` and ``.../unload`` (the RAM cache)."""
    web: bool = True
    """Serve the chat app at ``/`` (``serve.webapp``)."""
    allow_runtime_lora_updating: bool = False
    """Enable vLLM's ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``
    (``serve.lifecycle``: they change the store); without it those routes do not exist."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.kind, self.param, self.code),
                            status_code=self.status, headers=self.headers)


class ServerState:
    """What the routes share: the engine, admission counting and drain state."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.sources = engine.table.cache.source
        """What ``model`` names: the store, then plain adapters directories."""
        self.store = engine.table.cache.store
        """The store (None when only adapters directories are served)."""
        roots = [s.root for s in getattr(self.sources, "sources", [self.sources])]
        self._roots = [(str(r), "<store>" if self.store is not None and r == self.store.root
                        else "<adapters-dir>") for r in roots]
        self.tokenizer = engine.tokenizer
        self.metrics = Metrics(engine, engine.table.cache)
        model_config = engine.model.config
        self.context = int(getattr(model_config, "max_position_embeddings", 0)
                           or getattr(model_config, "n_positions", 0) or 2048)
        self.vocab = int(model_config.vocab_size)
        self.draining = False
        self.in_flight = 0
        self._lock = threading.Lock()

    def admit(self) -> None:
        with self._lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down", "server_error",
                               code="draining")
            if self.in_flight >= self.config.max_in_flight:
                raise ApiError(429, f"{self.in_flight} requests in flight; retry shortly",
                               "rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.metrics.in_flight.set(self.in_flight)

    def clean(self, message: str) -> str:
        """``message`` without filesystem paths."""
        for root, label in self._roots:
            message = message.replace(root, label)
        return _PATH.sub("<path>", message)


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The app; its lifespan starts the engine's loop and stops it at shutdown."""
    state = ServerState(engine, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="loratree", version="1", lifespan=lifespan)
    app.state.loratree = state
    _errors(app, state)
    _routes(app, state)
    _embedding_routes(app, state)
    if state.config.admin:
        _admin_routes(app, state)
    if state.config.web:
        web.add_web_app(app, state)
    if state.config.allow_runtime_lora_updating:
        lifecycle_routes(app, state)
        if state.config.api_key:
            logger.info("runtime LoRA updating is on (/v1/load_lora_adapter, "
                        "/v1/unload_lora_adapter), behind the API key")
        else:
            logger.warning("runtime LoRA updating is on and no API key is set: anyone who "
                           "reaches the server can add and remove adapters")
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)
    if state.config.api_key:
        app.add_middleware(ApiKey, key=state.config.api_key,
                           open_paths=OPEN_PATHS + (web.OPEN_PATHS if state.config.web else ()),
                           open_prefixes=web.OPEN_PREFIXES if state.config.web else ())
    app.add_middleware(CountRequests, routes=_ROUTES,
                       count=lambda route, status: state.metrics.requests.labels(
                           route, status).inc())
    return app


# -- routes ---------------------------------------------------------------------------------
def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    def health() -> JSONResponse:
        e = state.engine
        body = {"status": "ok", "engine_errors": e.faults, "last_error":
                state.clean(e.last_error) if e.last_error else None}
        if not e.alive or e.consecutive_failures:
            body["status"] = "failing" if e.alive else "dead"
            return JSONResponse(body, status_code=503)
        return JSONResponse(body)

    @app.get("/ready")
    def ready() -> JSONResponse:
        ok = not state.draining and state.engine.alive
        return JSONResponse({"ready": ok, "draining": state.draining},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    def models() -> dict:
        data = [{"id": state.config.base_name, "object": "model", "created": 0,
                 "owned_by": "loratree", "root": state.config.base_name, "parent": None}]
        for info in state.sources.list():
            data.append({"id": info.name, "object": "model", "created": 0,
                         "owned_by": "loratree", "root": state.config.base_name,
                         "parent": state.config.base_name, "kind": info.kind,
                         "rank": info.rank})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest) -> Response:
        body.check_supported()
        ids = _encode_text(state, body.prompt_value())
        return await _generate(state, request, body, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: HttpRequest) -> Response:
        body.check_supported()
        messages = [Message("system" if m.role == "developer" else m.role, m.text())
                    for m in body.messages if m.text()]
        ids = encode_prompt(messages, state.tokenizer)
        room = state.context - len(ids)
        budget = body.token_budget(min(state.config.default_max_tokens, max(room, 1)))
        return await _generate(state, request, body, ids, budget, chat=True)


def _admin_routes(app: FastAPI, state: ServerState) -> None:
    cache, table = state.engine.table.cache, state.engine.table

    @app.post("/admin/adapters/{name:path}/load")
    def load(name: str) -> dict:
        adapter = _known(state, name)
        cache.get(adapter)
        return {"loaded": adapter, **state.sources.info(adapter).to_dict()}

    @app.post("/admin/adapters/{name:path}/unload")
    def unload(name: str) -> dict:
        adapter = _known(state, name)
        was_active = table.deactivate(adapter)
        was_cached = adapter in cache
        cache.evict(adapter)
        return {"unloaded": adapter, "was_active": was_active, "was_cached": was_cached}


def _embedding_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        body.check_supported()
        adapter = _adapter(state, body.model)
        if adapter == AUTO:
            raise ApiError(400, f"embeddings need a named model, not {AUTO!r}", param="model",
                           code="invalid_model")
        state.admit()
        try:
            future = state.engine.embed(body.input, adapter)
            done = await asyncio.wait_for(asyncio.wrap_future(future),
                                          state.config.request_timeout_s)
        except EmbeddingInputError as e:
            raise ApiError(400, state.clean(str(e)), param="input", code=e.code) from None
        except TimeoutError:
            raise ApiError(504, f"no answer within {state.config.request_timeout_s:g} s",
                           "timeout_error", code="deadline_exceeded") from None
        finally:
            state.leave()
        state.metrics.adapter_requests.labels(body.model).inc()
        state.metrics.tokens.labels("prompt").inc(done.prompt_tokens)
        return JSONResponse(embedding_body(done.vectors.numpy(), body.model,
                                           done.prompt_tokens, body.encoding_format))


# -- one generation -------------------------------------------------------------------------
def _known(state: ServerState, name: str) -> str:
    try:
        check_name(name)
    except AdapterNameError as e:
        raise ApiError(400, state.clean(str(e)), param="model", code="invalid_model") from None
    if name not in state.sources:
        hint = ""
        if state.store is not None and _stray(state.store.root, name):
            hint = (f"; a PEFT directory was copied to <store>/{name} but never added "
                    f"(loratree store --store <store> add {name} <store>/{name})")
        raise ApiError(404, f"the model {name!r} does not exist{hint}", param="model",
                       code="model_not_found")
    return name


def _stray(root: Path, name: str) -> bool:
    """Whether a plain PEFT directory sits at ``name`` in a store root (not an entry)."""
    try:
        return plain_dir(root, name) is not None
    except AdapterNameError:  # a link on the way: no hint, the 404 stands
        return False


def _adapter(state: ServerState, model: str) -> str:
    if model in (state.config.base_name, BASE):
        return BASE
    if model == AUTO:
        return AUTO
    return _known(state, model)


def _encode_text(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(state.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    bad = next((t for t in prompt if t >= state.vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (size {state.vocab})",
                       param="prompt")
    return list(prompt)


async def _generate(state: ServerState, http: HttpRequest, body: Any, ids: list[int],
                    max_tokens: int, *, chat: bool) -> Response:
    adapter = _adapter(state, body.model)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
    if len(ids) + max_tokens > state.context:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) "
                       f"exceeds the model's context of {state.context} tokens",
                       param="max_tokens", code="context_length_exceeded")
    constraint = to_constraint(body.response_format)
    if constraint is not None and body.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with a JSON response_format (the "
                       "response ends when its JSON is complete)", param="ignore_eos")
    request = Request(ids, adapter=adapter, max_new_tokens=max_tokens,
                      temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                      seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos,
                      constraint=constraint)
    if request.constraint is not None:  # compiled off the event loop (then cached)
        try:
            await asyncio.to_thread(state.engine.grammars.compile, request.constraint)
        except ResponseFormatError as e:
            raise ApiError(400, state.clean(str(e)), param="response_format",
                           code="invalid_response_format") from None
    state.admit()
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    try:
        handle = state.engine.submit(request,
                                     on_event=lambda: loop.call_soon_threadsafe(wake.set))
    except BaseException:
        state.leave()
        raise
    state.metrics.adapter_requests.labels(body.model).inc()
    run = _Run(state, http, handle, wake, time.monotonic() + state.config.request_timeout_s)
    rid, model = new_id("chatcmpl" if chat else "cmpl"), body.model
    if not body.stream:
        try:
            await run.wait(until_end=True)
            done = run.result()
        finally:
            run.end()
        return JSONResponse(completion_body(
            chat=chat, rid=rid, model=model, text=done.text, finish=_finish(done),
            prompt_tokens=done.prompt_tokens, completion_tokens=len(done.tokens)))
    try:
        first = await run.wait(until_end=False)
        if run.finished and not first:
            run.result()  # an error before any text: answer with its status
    except BaseException:
        run.end()
        raise
    return StreamingResponse(_events(run, first, chat, rid, model, body.include_usage()),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _events(run: _Run, first: list[str], chat: bool, rid: str, model: str,
                  usage: bool) -> AsyncIterator[str]:
    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        yield event(chunk_body(chat=chat, rid=rid, model=model, text="".join(first),
                               finish=None, first=True))
        while not run.finished:
            try:
                deltas = await run.wait(until_end=False)
            except ApiError as e:  # the deadline passed mid-stream
                yield event(error_body(str(e), e.kind, e.param, e.code))
                return
            if deltas:
                yield event(chunk_body(chat=chat, rid=rid, model=model, text="".join(deltas),
                                       finish=None))
        done = run.handle.result()
        if done.finish_reason == FinishReason.ERROR:
            e = _error_of(run.state, done)
            yield event(error_body(str(e), e.kind, e.param, e.code))
            return
        yield event(chunk_body(chat=chat, rid=rid, model=model, text=None,
                               finish=_finish(done)))
        if usage:
            yield event(chunk_body(chat=chat, rid=rid, model=model, text=None, finish=None,
                                   usage=(done.prompt_tokens, len(done.tokens))))
        yield "data: [DONE]\n\n"
    finally:
        run.end()


class _Run:
    """One admitted request on the event loop: waits for the engine's events with the
    deadline and client disconnects in view, and accounts for it exactly once."""

    def __init__(self, state: ServerState, http: HttpRequest, handle: Handle,
                 wake: asyncio.Event, deadline: float) -> None:
        self.state, self.http, self.handle, self.wake = state, http, handle, wake
        self.deadline = deadline
        self.finished = False
        """The engine has sent everything (text and the end) and it has been read."""
        self._ended = False

    async def wait(self, *, until_end: bool) -> list[str]:
        """Text produced since the last call: at least one delta (or the end), or, with
        ``until_end``, everything up to the end. Raises 504 past the deadline."""
        out: list[str] = []
        while True:
            self.wake.clear()
            deltas, ended = self.handle.poll()
            out += deltas
            self.finished = self.finished or ended
            if self.finished or (out and not until_end):
                return out
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.handle.cancel()
                raise ApiError(504, f"no answer within {self.state.config.request_timeout_s:g}"
                               " s", "timeout_error", code="deadline_exceeded")
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                if await self.http.is_disconnected():
                    self.handle.cancel()

    def result(self) -> Completion:
        done = self.handle.result()
        if done.finish_reason == FinishReason.ERROR:
            raise _error_of(self.state, done)
        return done

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if not self.handle.done:
            self.handle.cancel()  # client gone or deadline: free the row and its slot
        self.state.leave()
        if self.handle.done:
            done = self.handle.result()
            m = self.state.metrics
            m.latency.observe(done.total_s)
            if done.tokens:
                m.ttft.observe(done.first_token_s)
            m.tokens.labels("prompt").inc(done.prompt_tokens)
            m.tokens.labels("completion").inc(len(done.tokens))


def _finish(done: Completion) -> str:
    """The API's finish reason: "length", else "stop" (what ends a response early is
    answered as an error, or nobody is left to read it)."""
    return (FinishReason.LENGTH if done.finish_reason == FinishReason.LENGTH
            else FinishReason.STOP).value


def _error_of(state: ServerState, done: Completion) -> ApiError:
    e = done.exception
    message = state.clean(f"{type(e).__name__}: {e}" if e is not None else str(done.error))
    if isinstance(e, AdapterNotFoundError):
        return ApiError(404, message, param="model", code="model_not_found")
    if isinstance(e, AdapterNameError):
        return ApiError(400, message, param="model", code="invalid_model")
    if isinstance(e, DamagedAdapterError):
        return ApiError(422, message, param="model", code="adapter_damaged")
    if isinstance(e, AdapterFileError | RankTooLargeError | TargetError | CacheFullError
                  | NonFiniteError):
        return ApiError(422, message, param="model", code="adapter_unusable")
    if isinstance(e, ValueError):
        return ApiError(400, message)
    return ApiError(500, "the engine failed on this request; see the server log",
                    "server_error", code="engine_error")


# -- errors ---------------------------------------------------------------------------------
def _errors(app: FastAPI, state: ServerState) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Unsupported)
    async def unsupported(_: HttpRequest, e: Unsupported) -> JSONResponse:
        return ApiError(400, str(e), param=e.param, code="unsupported_parameter").response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body",)]
        param = next((x for x in loc if not x.isdigit()), None) if loc else None
        what = first.get("msg", "invalid request")
        return ApiError(400, state.clean(f"{'.'.join(loc) or 'body'}: {what}"),
                        param=param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(_: HttpRequest, e: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return ApiError(e.status_code, str(e.detail), kind,
                        headers=getattr(e, "headers", None)).response()

    @app.exception_handler(AdapterInUseError)
    async def in_use(_: HttpRequest, e: AdapterInUseError) -> JSONResponse:
        return ApiError(409, state.clean(str(e)), code="adapter_in_use").response()

    @app.exception_handler(Exception)
    async def crash(_: HttpRequest, e: Exception) -> JSONResponse:
        failed = Completion("", (), FinishReason.ERROR, "", 0, str(e), exception=e)
        mapped = _error_of(state, failed)
        if mapped.status >= 500:
            logger.exception("unhandled error", exc_info=e)
        return mapped.response()

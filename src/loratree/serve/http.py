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
    AdapterInUseError,
    AdapterNameError,
    ResponseFormatError,
)
from loratree.models.chat import Message, encode_prompt
from loratree.serve import webapp as web
from loratree.serve.embeddings import EmbeddingInputError
from loratree.serve.engine import Engine
from loratree.serve.http_run import ApiError, Run, Stream, error_of, finish
from loratree.serve.lifecycle import lifecycle_routes
from loratree.serve.metrics import CONTENT_TYPE, Metrics
from loratree.serve.middleware import ApiKey, BodyLimit, CountRequests
from loratree.serve.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    Unsupported,
    completion_body,
    embedding_body,
    new_id,
)
from loratree.serve.openai_outputs import Outputs
from loratree.serve.requests import (
    AUTO,
    Completion,
    FinishReason,
    Request,
)
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
    """Choices admitted at once (running + waiting; a request has ``n`` per prompt); more
    get 429, and one request with more than this many gets 400."""
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

    def admit(self, choices: int = 1) -> None:
        with self._lock:
            if self.draining:
                raise ApiError(503, "the server is shutting down", "server_error",
                               code="draining")
            if self.in_flight + choices > self.config.max_in_flight:
                raise ApiError(429, f"{self.in_flight} requests in flight; retry shortly",
                               "rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self.in_flight += choices
            self.metrics.in_flight.set(self.in_flight)

    def leave(self, choices: int = 1) -> None:
        with self._lock:
            self.in_flight -= choices
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
        prompts = [_encode_text(state, p) for p in body.prompt_values()]
        return await _generate(state, request, body, prompts, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: HttpRequest) -> Response:
        body.check_supported()
        messages = [Message("system" if m.role == "developer" else m.role, m.text())
                    for m in body.messages if m.text()]
        ids = encode_prompt(messages, state.tokenizer)
        room = state.context - len(ids)
        budget = body.token_budget(min(state.config.default_max_tokens, max(room, 1)))
        return await _generate(state, request, body, [ids], budget, chat=True)


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


def _check_prompts(state: ServerState, body: Any, prompts: list[list[int]],
                   max_tokens: int, chat: bool) -> None:
    """400 for an empty prompt, one past the context, or more choices than can run."""
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty", param="messages" if chat else "prompt")
        if len(ids) + max_tokens > state.context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens "
                           f"({max_tokens}) exceeds the model's context of {state.context} "
                           "tokens", param="max_tokens", code="context_length_exceeded")
    rows = state.engine.scheduler.policy.max_batch
    if body.n > rows:
        raise ApiError(400, f"n = {body.n} is more than the {rows} rows a batch runs",
                       param="n")
    most = state.config.max_in_flight
    if len(prompts) * body.n > most:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n = {body.n} choices is more than "
                       f"the {most} this server runs at once", param="prompt" if
                       len(prompts) > 1 else "n")


def _requests(body: Any, adapter: str, prompts: list[list[int]], max_tokens: int
              ) -> list[Request]:
    """One engine request per prompt, each with the body's ``n``, outputs and format."""
    k, echo = body.top_logprobs_k(), getattr(body, "echo", False)
    prompt_k = k if echo and k is not None else (0 if max_tokens == 0 else None)
    constraint = to_constraint(body.response_format)
    if constraint is not None and body.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with a JSON response_format (the "
                       "response ends when its JSON is complete)", param="ignore_eos")
    return [Request(ids, adapter=adapter, max_new_tokens=max_tokens,
                    temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                    seed=body.seed, stop=body.stops(), ignore_eos=body.ignore_eos,
                    n=body.n, logprobs=k, prompt_logprobs=prompt_k, constraint=constraint)
            for ids in prompts]


async def _compile(state: ServerState, requests: list[Request]) -> None:
    """Compile a JSON format's grammar off the event loop (then cached); a schema that
    cannot be enforced is a 400."""
    if requests and requests[0].constraint is not None:
        try:
            await asyncio.to_thread(state.engine.grammars.compile, requests[0].constraint)
        except ResponseFormatError as e:
            raise ApiError(400, state.clean(str(e)), param="response_format",
                           code="invalid_response_format") from None


async def _generate(state: ServerState, http: HttpRequest, body: Any,
                    prompts: list[list[int]], max_tokens: int, *, chat: bool) -> Response:
    adapter = _adapter(state, body.model)
    _check_prompts(state, body, prompts, max_tokens, chat)
    requests = _requests(body, adapter, prompts, max_tokens)
    await _compile(state, requests)
    choices = len(prompts) * body.n
    state.admit(choices)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    try:  # all prompts at once: admitted (and prefilled) together as far as rows allow
        groups = state.engine.submit_batch(
            requests, on_event=lambda: loop.call_soon_threadsafe(wake.set))
    except BaseException:
        state.leave(choices)
        raise
    state.metrics.adapter_requests.labels(body.model).inc()
    handles = [h for group in groups for h in group]  # choice index = prompt * n + j
    run = Run(state, http, handles, wake, time.monotonic() + state.config.request_timeout_s)
    rid, model = new_id("chatcmpl" if chat else "cmpl"), body.model
    outputs = Outputs(state.tokenizer, chat, body.top_logprobs_k(),
                      echo=getattr(body, "echo", False))
    if not body.stream:
        try:
            await run.wait(until_end=True)
            dones = run.results()
        finally:
            run.end()
        return JSONResponse(completion_body(
            chat=chat, rid=rid, model=model,
            choices=[outputs.choice(i, d, prompts[i // body.n], finish(d))
                     for i, d in enumerate(dones)],
            prompt_tokens=sum(len(p) for p in prompts),
            completion_tokens=sum(len(d.tokens) for d in dones)))
    try:
        news = await run.wait(until_end=False)
        if outputs.echo and outputs.k is not None:
            news = await run.until_prefilled(news)
        if run.finished:
            run.results()  # an error before the stream began: answer with its status
    except BaseException:
        run.end()
        raise
    per_choice = [p for p in prompts for _ in range(body.n)]
    starts = [0 if outputs.echo else len(state.tokenizer.decode(p)) for p in per_choice]
    stream = Stream(run, outputs, chat, rid, model, [len(p) for p in prompts], starts,
                    echoed=per_choice if outputs.echo else None)
    return StreamingResponse(stream.events(news, body.include_usage()),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


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
        mapped = error_of(state, failed)
        if mapped.status >= 500:
            logger.exception("unhandled error", exc_info=e)
        return mapped.response()

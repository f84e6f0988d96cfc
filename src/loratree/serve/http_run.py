"""One admitted HTTP request's choices on the event loop, and how its end is answered.

``Run`` watches the engine handles of every choice (index = prompt * n + j) with the
deadline and client disconnects in view, and accounts for them exactly once; ``Stream``
turns what they produce into server-sent events, a chunk per choice with the logprobs of
the tokens it carries; ``error_of`` maps a failed completion to its status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse

from loratree.errors import (
    AdapterFileError,
    AdapterNameError,
    AdapterNotFoundError,
    CacheFullError,
    DamagedAdapterError,
    NonFiniteError,
    RankTooLargeError,
    TargetError,
)
from loratree.serve.openai_api import chunk_body, error_body
from loratree.serve.openai_outputs import Outputs
from loratree.serve.requests import Completion, FinishReason, Handle, TokenLogprob

if TYPE_CHECKING:
    from loratree.serve.http import ServerState

__all__ = ["ApiError", "News", "Run", "Stream", "error_of", "event", "finish"]


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


@dataclass
class Stream:
    """The server-sent events of one streamed request: chunks per choice index, each with
    the logprobs of the tokens it carries."""

    run: Run
    outputs: Outputs
    chat: bool
    rid: str
    model: str
    prompt_lens: list[int]
    offsets: list[int]
    """Per choice, where its next token's text starts (``text_offset``, completions): its
    prompt text's length at first (0 with echo: the prompt's tokens come first)."""
    echoed: list[list[int]] | None = None
    """With ``echo``: each choice's prompt, sent ahead of its first generated text (and
    its tokens' records ahead of the generated ones', when logprobs are asked for)."""

    def chunk(self, index: int, text: str | None, finish: str | None = None,
              records: list[TokenLogprob] | None = None, first: bool = False) -> str:
        logprobs = None
        if first and self.echoed is not None:
            prompt = self.echoed[index]
            text = self.outputs.tokenizer.decode(prompt) + (text or "")
            if self.outputs.k is not None:
                known = self.run.handles[index].prompt_logprobs
                logprobs = self.outputs.completion_logprobs(
                    prompt, known or [None] * len(prompt), self.offsets[index])
                self.offsets[index] += sum(len(t) for t in logprobs["tokens"])
        if records:
            more = self.outputs.chunk_logprobs(records, self.offsets[index])
            if more is not None and not self.chat:
                self.offsets[index] += sum(len(t) for t in more["tokens"])
            logprobs = more if logprobs is None or more is None else {
                key: logprobs[key] + more[key] for key in logprobs}
        return event(chunk_body(chat=self.chat, rid=self.rid, model=self.model, text=text,
                                finish=finish, first=first, index=index, logprobs=logprobs))

    async def events(self, news: dict[int, News], usage: bool) -> AsyncIterator[str]:
        run = self.run
        try:
            for i in range(len(run.handles)):
                first = news.get(i, News())
                yield self.chunk(i, "".join(first.text), records=first.records, first=True)
            while not run.finished:
                try:
                    news = await run.wait(until_end=False)
                except ApiError as e:  # the deadline passed mid-stream
                    yield event(error_body(str(e), e.kind, e.param, e.code))
                    return
                for i, new in news.items():
                    if new.text or new.records:
                        yield self.chunk(i, "".join(new.text), records=new.records)
            dones = [h.result() for h in run.handles]
            failed = next((d for d in dones if d.finish_reason == FinishReason.ERROR), None)
            if failed is not None:
                e = error_of(run.state, failed)
                yield event(error_body(str(e), e.kind, e.param, e.code))
                return
            for i, done in enumerate(dones):
                yield self.chunk(i, None, finish=finish(done))
            if usage:
                total = (sum(self.prompt_lens), sum(len(d.tokens) for d in dones))
                yield event(chunk_body(chat=self.chat, rid=self.rid, model=self.model,
                                        text=None, finish=None, usage=total))
            yield "data: [DONE]\n\n"
        finally:
            run.end()


def event(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class News:
    """What one choice produced since the last look: text deltas and token records."""

    text: list[str] = field(default_factory=list)
    records: list[TokenLogprob] = field(default_factory=list)


class Run:
    """One admitted request's choices on the event loop: waits for the engine's events
    with the deadline and client disconnects in view, and accounts for them exactly
    once."""

    def __init__(self, state: ServerState, http: HttpRequest, handles: list[Handle],
                 wake: asyncio.Event, deadline: float) -> None:
        self.state, self.http, self.handles, self.wake = state, http, handles, wake
        self.deadline = deadline
        self._ended_choices = [False] * len(handles)
        self._ended = False

    @property
    def finished(self) -> bool:
        """The engine has sent everything (text and the end) of every choice and it has
        been read."""
        return all(self._ended_choices)

    def _poll(self, out: dict[int, News]) -> bool:
        """Add what each choice produced since the last poll to ``out``; whether any."""
        got = False
        for i, handle in enumerate(self.handles):
            deltas, ended = handle.poll()
            records = handle.poll_logprobs()
            if deltas or records:
                new = out.setdefault(i, News())
                new.text += deltas
                new.records += records
                got = True
            self._ended_choices[i] = self._ended_choices[i] or ended
        return got

    async def until_prefilled(self, news: dict[int, News]) -> dict[int, News]:
        """``news``, and what follows, until every choice has its prompt's records (or has
        ended): a stream that echoes the prompt with logprobs sends them first."""
        while not self.finished and not all(
                h.prompt_logprobs is not None or ended
                for h, ended in zip(self.handles, self._ended_choices, strict=True)):
            for i, new in (await self.wait(until_end=False)).items():
                have = news.setdefault(i, News())
                have.text += new.text
                have.records += new.records
        return news

    async def wait(self, *, until_end: bool) -> dict[int, News]:
        """What each choice produced since the last call (by choice index): something (or
        the end of all), or, with ``until_end``, everything up to the end of all. Raises
        504 past the deadline."""
        out: dict[int, News] = {}
        while True:
            self.wake.clear()
            got = self._poll(out)
            if self.finished or (got and not until_end):
                return out
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self._cancel()
                raise ApiError(504, f"no answer within {self.state.config.request_timeout_s:g}"
                               " s", "timeout_error", code="deadline_exceeded")
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                if await self.http.is_disconnected():
                    self._cancel()

    def _cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def results(self) -> list[Completion]:
        """Every choice's completion; the first failed one's error is raised."""
        dones = [h.result() for h in self.handles]
        for done in dones:
            if done.finish_reason == FinishReason.ERROR:
                raise error_of(self.state, done)
        return dones

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for handle in self.handles:
            if not handle.done:
                handle.cancel()  # client gone or deadline: free the row and its slot
        self.state.leave(len(self.handles))
        m = self.state.metrics
        for handle in self.handles:
            if handle.done:
                done = handle.result()
                m.latency.observe(done.total_s)
                if done.tokens:
                    m.ttft.observe(done.first_token_s)
                m.tokens.labels("prompt").inc(done.prompt_tokens)
                m.tokens.labels("completion").inc(len(done.tokens))


def finish(done: Completion) -> str:
    """The API's finish reason: "length", else "stop" (what ends a response early is
    answered as an error, or nobody is left to read it)."""
    return (FinishReason.LENGTH if done.finish_reason == FinishReason.LENGTH
            else FinishReason.STOP).value


def error_of(state: ServerState, done: Completion) -> ApiError:
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

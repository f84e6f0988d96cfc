"""The OpenAI API's request and response bodies, as far as loratree serves them.

Names, defaults and ranges follow OpenAI's (``max_tokens`` 16 for completions, temperature
in [0, 2], ``top_p`` in (0, 1], at most 4 stop strings), plus two extensions every
open-source server has: ``top_k`` and ``ignore_eos``. A parameter loratree does not
implement (``suffix``, non-zero penalties, tools, ``best_of`` other than ``n``) is
refused with a 400 that names it rather than silently ignored; unknown fields are refused
the same way.

Outputs (``serve.openai_outputs`` builds them): ``n`` choices per prompt, ``logprobs``
(completions: an int, the alternatives per token; chat: a bool with ``top_logprobs``) and
``echo`` (completions: the prompt's text and, with ``logprobs``, its tokens' logprobs;
``max_tokens`` may then be 0; in a stream, each choice's first chunk carries them). A
completions ``prompt`` is a text, token ids, or a list of either: one choice (or ``n``)
per prompt, in order. ``response_format`` (structured outputs) is read in
``serve.response_format``.
"""

from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from loratree.serve.response_format import ResponseFormat

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "EmbeddingRequest",
    "TextPart",
    "Unsupported",
    "choice_body",
    "chunk_body",
    "completion_body",
    "embedding_body",
    "error_body",
    "new_id",
]

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000
MAX_PROMPTS = 256
"""Prompts in one completions request (a batch, as lm-eval sends)."""
MAX_TOP_LOGPROBS = 20


class Unsupported(ValueError):
    """A valid OpenAI parameter whose value loratree does not implement."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=100_000)] = 0
    """0: no top-k cut (extension)."""
    n: Annotated[int, Field(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: (Annotated[str, Field(max_length=MAX_STOP_CHARS)]
           | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                       Field(max_length=MAX_STOP)]
           | None) = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    user: Annotated[str, Field(max_length=256)] | None = None
    ignore_eos: bool = False
    """Generate exactly ``max_tokens`` tokens (extension, as vLLM's)."""
    response_format: ResponseFormat | None = None
    """Structured output (``serve.response_format``); on completions too, as vLLM's."""

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)

    def check_supported(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise Unsupported(name, f"{name} is not supported; leave it at 0")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


_TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]],
                     Field(min_length=1, max_length=32_768)]
_Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (_Text | _TokenIds
             | Annotated[list[_Text], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[_TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)])
    """Text, token ids, or a list of either (a batch: one choice per prompt, in order)."""
    max_tokens: Annotated[int, Field(ge=0, le=1_000_000)] = 16
    """0 only with ``echo``: the prompt's logprobs, nothing generated."""
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """Alternatives reported per token (with the chosen one), 0 to 20."""
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128)] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise Unsupported("best_of", "best_of is supported only equal to n")
        if self.max_tokens == 0 and not self.echo:
            raise Unsupported("max_tokens", "max_tokens 0 needs echo (prompt logprobs only)")

    def top_logprobs_k(self) -> int | None:
        """Alternatives reported per token (None: no logprobs)."""
        return self.logprobs

    def prompt_values(self) -> list[str | list[int]]:
        """The prompts, in order: one text or id list each."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: (Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
              | Annotated[list[TextPart], Field(min_length=1, max_length=64)])
    name: Annotated[str, Field(max_length=64)] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """Alternatives per token, 0 to 20; needs ``logprobs: true``."""

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise Unsupported("tools", "tools (function calling) are not supported; for "
                              "structured output use response_format json_schema")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")

    def top_logprobs_k(self) -> int | None:
        """Alternatives reported per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @model_validator(mode="after")
    def _last_turn(self) -> ChatCompletionRequest:
        if not any(m.text() for m in self.messages):
            raise ValueError("messages: every message is empty")
        return self

    def token_budget(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


def error_body(message: str, kind: str, param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_body(*, chat: bool, index: int, text: str, finish: str,
                logprobs: dict | None = None) -> dict:
    """One choice of a whole response (``logprobs``: ``serve.openai_outputs``)."""
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def completion_body(*, chat: bool, rid: str, model: str, choices: list[dict],
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole (non-streamed) response: its ``choice_body``s and the usage (prompt tokens
    once per prompt, completion tokens of every choice)."""
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens)}


def chunk_body(*, chat: bool, rid: str, model: str, text: str | None, finish: str | None,
               first: bool = False, usage: tuple[int, int] | None = None, index: int = 0,
               logprobs: dict | None = None) -> dict:
    """One server-sent event of a streamed response, for choice ``index`` (with the
    ``logprobs`` of the tokens it carries); ``usage`` makes the final usage-only chunk
    (``stream_options.include_usage``)."""
    if usage is not None:
        choices: list = []
    elif chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": index, "delta": delta, "finish_reason": finish,
                    "logprobs": logprobs}]
    else:
        choices = [{"index": index, "text": text or "", "finish_reason": finish,
                    "logprobs": logprobs}]
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = _usage(*usage)
    return body


MAX_EMBEDDING_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``. ``dimensions`` is refused (the vectors have the model's
    hidden size); emptiness, token ids and lengths are checked against the model by the
    engine (``serve.embeddings``)."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)]
    input: (Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
            | Annotated[list[Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]],
                        Field(max_length=32_768)]
            | Annotated[list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]],
                        Field(max_length=MAX_EMBEDDING_INPUTS)]
            | Annotated[list[Annotated[list[Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]],
                                       Field(max_length=32_768)]],
                        Field(max_length=MAX_EMBEDDING_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: Annotated[str, Field(max_length=256)] | None = None

    def check_supported(self) -> None:
        if self.dimensions is not None:
            raise Unsupported("dimensions", "dimensions is not supported: an embedding has "
                              "the model's hidden size; leave dimensions out")


def embedding_body(vectors: np.ndarray, model: str, prompt_tokens: int,
                   encoding_format: Literal["float", "base64"]) -> dict:
    """OpenAI's embeddings response for ``vectors`` (inputs, hidden); base64 is the
    little-endian float32 bytes of each vector."""
    rows = np.asarray(vectors, dtype="<f4")
    data = [{"object": "embedding", "index": i,
             "embedding": (base64.b64encode(row.tobytes()).decode("ascii")
                           if encoding_format == "base64" else row.tolist())}
            for i, row in enumerate(rows)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

"""The OpenAI API's request and response bodies, as far as loratree serves them.

Names, defaults and ranges follow OpenAI's (``max_tokens`` 16 for completions, temperature
in [0, 2], ``top_p`` in (0, 1], at most 4 stop strings), plus two extensions every
open-source server has: ``top_k`` and ``ignore_eos``. A parameter loratree does not
implement (``n`` > 1, ``logprobs``, ``echo``, non-zero penalties, tools) is refused with a
400 that names it rather than silently ignored; unknown fields are refused the same way.
``response_format`` (structured outputs) is read in ``serve.response_format``.
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
    "chunk_body",
    "completion_body",
    "embedding_body",
    "error_body",
    "new_id",
]

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000


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
    logprobs: bool | int | None = None
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
        if self.n != 1:
            raise Unsupported("n", "only n=1 is supported; send one request per completion")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise Unsupported(name, f"{name} is not supported; leave it at 0")
        if self.logprobs not in (None, False, 0):
            raise Unsupported("logprobs", "logprobs are not supported")

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: (Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
             | Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]],
                         Field(min_length=1, max_length=32_768)]
             | Annotated[list[Annotated[str, Field(min_length=1,
                                                   max_length=MAX_PROMPT_CHARS)]],
                         Field(min_length=1, max_length=1)])
    """Text, token ids, or a list holding one text."""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] = 16
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return self.prompt[0]
        return self.prompt  # type: ignore[return-value]


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

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise Unsupported("tools", "tools (function calling) are not supported; for "
                              "structured output use response_format json_schema")

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


def completion_body(*, chat: bool, rid: str, model: str, text: str, finish: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    """A whole (non-streamed) response."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": _usage(prompt_tokens, completion_tokens)}


def chunk_body(*, chat: bool, rid: str, model: str, text: str | None, finish: str | None,
               first: bool = False, usage: tuple[int, int] | None = None) -> dict:
    """One server-sent event of a streamed response; ``usage`` makes the final usage-only
    chunk (``stream_options.include_usage``)."""
    if usage is not None:
        choices: list = []
    elif chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish,
                    "logprobs": None}]
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

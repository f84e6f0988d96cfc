"""What a caller hands the engine and gets back: ``Request``, ``Handle``, ``Completion``."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from loratree.serve.constrain import JsonFormat
from loratree.serve.slot_table import BASE

__all__ = ["AUTO", "MAX_LOGPROBS", "Completion", "FinishReason", "Handle", "Request",
           "TokenLogprob", "prompt_ids"]

AUTO = "auto"
"""A request's adapter chosen by the router."""

MAX_LOGPROBS = 20
"""Most alternatives a request may ask for per token (OpenAI's limit)."""

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """One generation: a prompt (text, or token ids) for one adapter."""

    prompt: str | Sequence[int]
    adapter: str = BASE
    """A store name, ``__base__`` for the bare model, or ``auto``: the adapter whose
    training prompts this prompt most resembles (``serve.router``)."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    """0: greedy."""
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token, up to ``max_new_tokens`` (as vLLM's
    option of that name; for benchmarks and fixed-length outputs)."""
    constraint: JsonFormat | None = None
    """Structured output: the tokens are constrained to JSON (any object, or valid against
    a schema; ``serve.constrain``), and the request ends when the JSON is complete."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most probable
    alternatives (0 to ``MAX_LOGPROBS``; None: no log-probabilities, no cost). From the raw
    logits: before temperature, top-k and top-p (``ops.logprobs``)."""
    prompt_logprobs: int | None = None
    """Report each prompt token's log-probability (the first token has none) and this many
    alternatives. The prompt is then prefilled with logits at every position, on its own
    (never inside a packed step). With it, ``max_new_tokens`` may be 0: prompt only."""
    n: int = 1
    """Choices sampled from one prefill of the prompt (``Engine.submit_choices``); choice j
    samples with seed ``seed + j``."""

    def __post_init__(self) -> None:
        problems = []
        least = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < least:
            problems.append(f"max_new_tokens must be an int >= {least}, got "
                            f"{self.max_new_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                problems.append(f"{name} must be None or an int in [0, {MAX_LOGPROBS}], "
                                f"got {k!r}")
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n must be a positive int, got {self.n!r}")
        if not 0.0 <= self.temperature <= 100.0:
            problems.append(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.constraint is not None and not isinstance(self.constraint, JsonFormat):
            problems.append(f"constraint must be a JsonFormat, got {self.constraint!r}")
        if self.constraint is not None and self.ignore_eos:
            problems.append("ignore_eos cannot be combined with a constraint (a constrained "
                            "request ends when its JSON is complete)")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if problems:
            raise ValueError("invalid Request: " + "; ".join(problems))


class FinishReason(StrEnum):
    """Why a request ended; the values are what the HTTP API answers."""

    STOP = "stop"
    """A stop string or the end-of-sequence token."""
    LENGTH = "length"
    """``max_new_tokens`` reached."""
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the most probable alternatives at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability), most probable first."""


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    adapter: str
    prompt_tokens: int
    error: str | None = None
    first_token_s: float = 0.0
    """Seconds from submit to the first token."""
    total_s: float = 0.0
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    """What failed the request, when ``finish_reason`` is "error" (its type tells a server
    which status to answer with)."""
    logprobs: tuple[TokenLogprob, ...] | None = None
    """One record per token of ``tokens`` (``Request.logprobs``), else None."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """One per prompt token, None for the first (``Request.prompt_logprobs``), else None."""


_DONE = object()


class Handle:
    """A submitted request (one choice of it): iterate for text deltas, or wait for the
    ``result()``. ``choice``: which of the request's ``n`` choices (its seed is
    ``seed + choice``)."""

    def __init__(self, request_id: int, request: Request,
                 on_event: Callable[[], None] | None = None, choice: int = 0) -> None:
        self.id, self.request, self.choice = request_id, request, choice
        self.logprobs: list[TokenLogprob] | None = (
            None if request.logprobs is None else [])
        """The generated tokens' records so far, appended by the engine's thread."""
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        """The prompt's records (``Request.prompt_logprobs``), set at prefill, before the
        first generated token is announced."""
        self._logprobs_read = 0
        self._on_event = on_event
        self._queue: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._result: Completion | None = None
        self.cancelled = False
        self.submitted = time.perf_counter()

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} is still running")
        assert self._result is not None
        return self._result

    def cancel(self) -> None:
        """Stop generating; the request ends with finish_reason "cancelled"."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def poll(self) -> tuple[list[str], bool]:
        """Without waiting: (the text deltas produced since the last poll, whether the
        request has ended). For event loops, with ``on_event`` waking them."""
        deltas, ended = [], False
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return deltas, ended
            if item is _DONE:
                ended = True
            else:
                deltas.append(item)

    def poll_logprobs(self) -> list[TokenLogprob]:
        """The generated tokens' records added since the last call (empty without
        ``Request.logprobs``); for streams, beside ``poll``."""
        if self.logprobs is None:
            return []
        upto = len(self.logprobs)  # the engine only appends
        new = self.logprobs[self._logprobs_read:upto]
        self._logprobs_read = upto
        return new

    def _emit(self, text: str) -> None:
        if text:
            self._queue.put(text)
            self._notify()

    def _finish(self, completion: Completion) -> None:
        self._result = completion
        self._done.set()
        self._queue.put(_DONE)
        self._notify()

    def _notify(self) -> None:
        if self._on_event is not None:
            try:
                self._on_event()
            except Exception:  # a listener's failure must not stop the engine
                logger.exception("request %d: event listener failed", self.id)


def prompt_ids(tokenizer: object, prompt: str | Sequence[int]) -> list[int]:
    """A request's prompt as token ids: a string tokenized without special tokens, ids as
    given. An empty prompt is a ``ValueError`` (the request fails alone)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids

"""Structured outputs: a request's JSON format, its grammar, and each row's matcher.

A request may ask for JSON (``JsonFormat``): any JSON object, or JSON valid against a JSON
schema. llguidance compiles the schema to a grammar and, per row, a matcher tracks the
tokens sampled so far and says which tokens may come next. Before a constrained row
samples, the tokens the grammar refuses get -inf logits (``ops.token_mask``); the
end-of-sequence token is allowed only where the grammar accepts, and the row ends as soon
as the grammar is complete. Rows without a format never reach this module.

Per engine (``Grammars``): the llguidance tokenizer is built once, on the first
constrained request (it depends on the tokenizer only), and compiled grammars are kept in
a small LRU keyed by the schema's text; a request starts from a copy of the compiled
matcher, so a schema is compiled once however many requests use it.

JSON is generated compact (no whitespace between tokens of JSON; strings keep theirs): a
grammar that allows any whitespace lets a model pad forever, and compact JSON is as valid.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from loratree.errors import ResponseFormatError
from loratree.ops.token_mask import apply_token_mask, unpack_token_mask

__all__ = ["Constraint", "Grammars", "JsonFormat", "JsonMode"]

logger = logging.getLogger(__name__)

ANY_OBJECT = '{"type":"object"}'
"""The schema of ``JsonMode.OBJECT``: any JSON object."""
COMPILE_OPTIONS = {"whitespace_flexible": False}
"""llguidance's JSON options: compact JSON (see the module docstring)."""


class JsonMode(StrEnum):
    """What a constrained request's output must be (the OpenAI ``response_format`` types)."""

    OBJECT = "json_object"
    """Any JSON object."""
    SCHEMA = "json_schema"
    """JSON valid against ``JsonFormat.schema``."""


@dataclass(frozen=True)
class JsonFormat:
    """A request's structured output. ``JsonFormat()`` asks for any JSON object;
    ``JsonFormat.of_schema(schema)`` for JSON valid against a JSON schema."""

    mode: JsonMode = JsonMode.OBJECT
    schema: str | None = None
    """``SCHEMA`` only: the JSON schema as JSON text (an object, or ``true``/``false``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.mode, JsonMode):
            raise ResponseFormatError(f"mode must be a JsonMode, got {self.mode!r}")
        if self.mode is JsonMode.OBJECT:
            if self.schema is not None:
                raise ResponseFormatError("a json_object format takes no schema")
            return
        if not isinstance(self.schema, str):
            raise ResponseFormatError(f"a json_schema format needs the schema as JSON text, "
                                      f"got {type(self.schema).__name__}")
        try:
            parsed = json.loads(self.schema)
        except json.JSONDecodeError as e:
            raise ResponseFormatError(f"the schema is not JSON: {e}") from None
        if not isinstance(parsed, dict | bool):
            raise ResponseFormatError(
                f"a JSON schema must be an object or a boolean, got {type(parsed).__name__}")

    @classmethod
    def of_schema(cls, schema: Mapping[str, Any] | bool) -> JsonFormat:
        """The format of JSON valid against ``schema`` (its key order is kept: properties
        are generated in the order the schema lists them)."""
        try:
            text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ResponseFormatError(f"the schema is not JSON: {e}") from None
        return cls(JsonMode.SCHEMA, text)

    @property
    def key(self) -> str:
        """The schema text its grammar is compiled from (the grammar cache's key)."""
        return ANY_OBJECT if self.mode is JsonMode.OBJECT else str(self.schema)


class Constraint:
    """One row's grammar state: the tokens allowed next, advanced by each sampled token."""

    def __init__(self, matcher: Any, vocab: int, grammar_vocab: int) -> None:
        self._matcher, self.vocab = matcher, vocab
        self._words = torch.zeros((grammar_vocab + 31) // 32, dtype=torch.int32)
        """The bitmask llguidance writes, one bit per token of its vocabulary."""

    def mask(self, logits: Tensor) -> Tensor:
        """``logits`` (V,) with the tokens the grammar refuses at -inf; a ``ValueError``
        where it allows none (the vocabulary cannot spell what the schema needs next)."""
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if not bool(words.any()):
            raise ValueError("the response format allows no token of this vocabulary next: "
                             + (self._matcher.get_error() or "the schema needs text the "
                                "tokenizer cannot spell"))
        allowed = unpack_token_mask(words.to(logits.device), self.vocab)
        return apply_token_mask(logits, allowed)

    def advance(self, token: int) -> None:
        """The grammar takes ``token``; a token it refuses is a ``RuntimeError`` (it cannot
        be sampled from masked logits, so that is a broken state)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the response format's grammar refused token {token}: "
                               f"{self._matcher.get_error() or 'no reason given'}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end of sequence may follow."""
        return bool(self._matcher.is_stopped())


class Grammars:
    """The grammars of one engine: the llguidance tokenizer (built on first use) and an LRU
    of compiled matchers keyed by schema text. Thread-safe: the HTTP layer compiles on
    worker threads, the engine starts rows on its own."""

    def __init__(self, tokenizer: object, vocab: int, eos: Iterable[int],
                 capacity: int = 64) -> None:
        self.tokenizer, self.vocab, self.capacity = tokenizer, vocab, capacity
        self.eos = sorted(eos)
        self.compiles = 0
        """Schemas compiled so far (cache misses)."""
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        """Guards the cache."""
        self._compiling = threading.Lock()
        """Held while compiling (and while building the tokenizer)."""

    def compile(self, fmt: JsonFormat) -> Any:
        """The pristine matcher of ``fmt``'s grammar (cached); a schema llguidance refuses
        is a ``ResponseFormatError`` naming the problem. Compiles run one at a time, so
        requests arriving together with a new schema compile it once; a cache hit never
        waits for a compile."""
        key = fmt.key
        matcher = self._cached(key)
        if matcher is not None:
            return matcher
        with self._compiling:
            matcher = self._cached(key)  # compiled while this thread waited
            if matcher is None:
                matcher = _compile(key, self._llg_tokenizer())
                with self._lock:
                    self.compiles += 1
                    self._compiled[key] = matcher
                    while len(self._compiled) > self.capacity:
                        self._compiled.popitem(last=False)
        return matcher

    def _cached(self, key: str) -> Any:
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
        return None

    def start(self, fmt: JsonFormat) -> Constraint:
        """A new row's constraint: a fresh copy of the compiled matcher."""
        matcher = self.compile(fmt).deep_copy()
        return Constraint(matcher, self.vocab, self._ll_tokenizer.vocab_size)

    def _llg_tokenizer(self) -> Any:
        """llguidance's view of the tokenizer, built once (under ``_compiling``)."""
        if self._ll_tokenizer is None:
            import llguidance.hf

            try:
                self._ll_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.vocab, eos_token=self.eos or None)
            except Exception as e:  # the tokenizer's kind, not the request: say which
                raise ResponseFormatError(
                    f"structured outputs are unavailable with this model's tokenizer "
                    f"({type(self.tokenizer).__name__}): {e}") from e
        return self._ll_tokenizer


def _compile(schema: str, tokenizer: Any) -> Any:
    """A matcher for the JSON schema ``schema`` (text), or the error llguidance gives."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=COMPILE_OPTIONS)
    except ValueError as e:
        raise ResponseFormatError(f"invalid JSON schema: {e}") from None
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.is_error():
        raise ResponseFormatError(f"invalid JSON schema: {matcher.get_error()}")
    return matcher

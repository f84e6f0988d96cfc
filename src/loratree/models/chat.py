"""Conversations and their encoding: chat template, tokens, assistant-only labels.

The tokenizer's own chat template is used when it has one. A tokenizer without one (the
tiny tokenizers tests build in code) gets :data:`DEFAULT_CHAT_TEMPLATE`::

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos_token}

that is, every turn is ``<|role|>\\n`` then its content, closed by ``\\n``, except an
assistant turn, which is closed by the tokenizer's end-of-sequence token so that the model
learns to stop. The generation prompt is ``<|assistant|>\\n``.

Text is rendered with ``apply_chat_template(..., tokenize=False)`` and tokenized with
``add_special_tokens=False``, exactly as ``apply_chat_template(..., tokenize=True)`` does,
so the template alone decides which special tokens appear. As in transformers, content
that spells a special token (``"<|im_end|>"``) is read as that token.

Finding assistant turn ``i`` (see :func:`assistant_spans`): the turn starts where the
rendering of ``messages[:i]`` with the generation prompt ends, and ends where the
rendering of ``messages[:i + 1]`` ends. Both renderings are tokenized and checked to be
token prefixes of the whole conversation's tokens; where a tokenizer merges across the
boundary they are not, and the span is found by character offsets instead (fast
tokenizers only). The span is then cut after its last end-of-sequence token, so the
template's end-of-turn token is learned but the whitespace a template writes after it
is not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from loratree.errors import EmptyRowError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "IGNORE_INDEX",
    "ROLES",
    "Conversation",
    "Encoded",
    "Example",
    "Message",
    "assistant_spans",
    "encode",
    "encode_messages",
    "encode_prompt",
    "prompt_messages",
    "reference",
    "render",
]

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
IGNORE_INDEX = -100  # the label torch's cross_entropy (and transformers' loss) skips

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    """``"system"``, ``"user"`` or ``"assistant"``."""
    content: str
    """The turn's text, non-empty."""


@dataclass(frozen=True)
class Conversation:
    """One training example: turns in order, at least one of them the assistant's."""

    messages: tuple[Message, ...]


def prompt_messages(conversation: Conversation) -> tuple[Message, ...]:
    """The turns before the final assistant turn: what a model is given to generate it."""
    last = max(i for i, m in enumerate(conversation.messages) if m.role == "assistant")
    return conversation.messages[:last]


def reference(conversation: Conversation) -> str:
    """The content of the final assistant turn: the expected output for exact-match scoring."""
    return conversation.messages[len(prompt_messages(conversation))].content


@dataclass(frozen=True)
class Example:
    """One encoded conversation: token ids and labels (-100 off the assistant turns)."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"input_ids and labels differ in length: {len(self.input_ids)} "
                f"vs {len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class Encoded:
    """Encoded examples, and how many were cut or dropped to fit ``max_length``."""

    examples: tuple[Example, ...]
    """The kept examples, in row order."""
    truncated: int
    """Rows longer than ``max_length`` tokens, cut to their first ``max_length`` tokens
    (dropped ones included)."""
    dropped: int
    """Rows dropped because no assistant token was left after truncation."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> list[int]:
        """Token count of each example, for ``batch_order(..., group_by_length=True)``."""
        return [len(e) for e in self.examples]


def encode(
    rows: Iterable[Conversation],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
) -> Encoded:
    """Tokenize conversations with the chat template; label only the assistant tokens.

    ``rows`` is any iterable of conversations, a ``RowSet`` included.
    An example longer than ``max_length`` keeps its first ``max_length`` tokens; one with
    no assistant token left is dropped. Both are counted and logged as warnings.

    Raises:
        ValueError: ``max_length`` is below 1, or the chat template cannot be used (see
            :func:`assistant_spans`).
        EmptyRowError: a row has no labelled token after its first position (nothing
            to learn: its prompt and answer encode to nothing); the message names where
            the row is (``train.jsonl:7`` for a ``RowSet``, else ``row N``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    conversations = tuple(rows)
    places = tuple(getattr(rows, "places", ())) or tuple(
        f"row {i + 1}" for i in range(len(conversations)))
    examples: list[Example] = []
    truncated = dropped = 0
    for place, conversation in zip(places, conversations, strict=True):
        ids, labels = encode_messages(conversation.messages, tokenizer)
        if not any(label != IGNORE_INDEX for label in labels[1:]):
            raise EmptyRowError(
                f"{place}: the row encodes to no token a model can learn (its assistant "
                f"text gives {sum(lab != IGNORE_INDEX for lab in labels)} labelled token(s) "
                f"in {len(ids)}, none after the first position); check its text against "
                "the tokenizer")
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append(Example(input_ids=ids, labels=labels))
    if truncated:
        logger.warning(
            "truncated %d of %d example(s) to max_length=%d tokens",
            truncated,
            len(conversations),
            max_length,
        )
    if dropped:
        logger.warning(
            "dropped %d example(s) with no assistant token within max_length=%d",
            dropped,
            max_length,
        )
    return Encoded(examples=tuple(examples), truncated=truncated, dropped=dropped)


def render(
    messages: Sequence[Message],
    tokenizer: PreTrainedTokenizerBase,
    *,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as text, by the tokenizer's chat template or the built-in one.

    Raises:
        ValueError: the tokenizer has no chat template and no eos token to end turns with,
            or the template did not render to text.
    """
    kwargs: dict[str, str] = {}
    if getattr(tokenizer, "chat_template", None) is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "the tokenizer has no chat template and no eos_token to end assistant "
                "turns with; set tokenizer.chat_template or tokenizer.eos_token"
            )
        kwargs["chat_template"] = DEFAULT_CHAT_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )
    if not isinstance(text, str):
        raise ValueError(f"the chat template rendered a {type(text).__name__}, not text")
    return text


def encode_prompt(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of ``messages`` followed by the generation prompt, ready for ``generate``.

    Pass a conversation without its final assistant turn (:func:`prompt_messages`); the
    ids equal the training tokens that precede that turn.
    """
    return _tokenize(render(messages, tokenizer, add_generation_prompt=True), tokenizer)


def encode_messages(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its labels: the id on assistant tokens, else -100.

    Labels are aligned with the ids (``labels[t]`` is token ``t``); a causal LM shifts
    them itself, as transformers' models do.
    """
    ids, spans = assistant_spans(messages, tokenizer)
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        labels[start:end] = ids[start:end]
    return ids, labels


def assistant_spans(
    messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and the ``[start, end)`` token span of each assistant turn.

    Raises:
        ValueError: the first message is an assistant turn (there is no prompt to render
            before it), or the template renders earlier turns differently once later turns
            are added, so an assistant turn cannot be located.
    """
    if messages and messages[0].role == "assistant":
        raise ValueError("a conversation must not start with an assistant turn")
    full_text = render(messages, tokenizer)
    ids = _tokenize(full_text, tokenizer)
    offsets: list[tuple[int, int]] | None = None
    spans = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start_text = render(messages[:i], tokenizer, add_generation_prompt=True)
        end_text = render(messages[: i + 1], tokenizer)
        span = _token_span(ids, _tokenize(start_text, tokenizer), _tokenize(end_text, tokenizer))
        if span is None:
            if not (full_text.startswith(start_text) and full_text.startswith(end_text)):
                raise ValueError(
                    f"cannot locate assistant turn {i}: the chat template renders the "
                    "conversation before it differently once later turns are added"
                )
            offsets = offsets if offsets is not None else _offsets(full_text, tokenizer)
            span = _char_span_to_tokens(offsets, len(start_text), len(end_text))
        spans.append(_cut_after_eos(ids, span, tokenizer.eos_token_id))
    return ids, spans


def _tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _token_span(ids: list[int], start_ids: list[int], end_ids: list[int]) -> tuple[int, int] | None:
    """``(len(start_ids), len(end_ids))`` if both are token prefixes of ``ids``, else None."""
    if ids[: len(start_ids)] != start_ids or ids[: len(end_ids)] != end_ids:
        return None
    return len(start_ids), len(end_ids)


def _offsets(text: str, tokenizer: PreTrainedTokenizerBase) -> list[tuple[int, int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} merges tokens across the start or end of an "
            "assistant turn, and locating it by character offsets needs a fast tokenizer"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [tuple(pair) for pair in encoding["offset_mapping"]]


def _char_span_to_tokens(
    offsets: list[tuple[int, int]], char_start: int, char_end: int
) -> tuple[int, int]:
    """The tokens overlapping ``[char_start, char_end)``; a token straddling an edge counts."""
    inside = [t for t, (a, b) in enumerate(offsets) if a < char_end and b > char_start]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _cut_after_eos(ids: list[int], span: tuple[int, int], eos_id: int | None) -> tuple[int, int]:
    """End the span at its last eos token, dropping what the template writes after it."""
    start, end = span
    for t in range(end - 1, start - 1, -1):
        if ids[t] == eos_id:
            return start, t + 1
    return span

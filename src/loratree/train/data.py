"""Training data: read rows, encode them with assistant-only labels, and batch them.

A row is a JSON object in one of two shapes::

    {"prompt": "...", "completion": "..."}
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}

Both become a :class:`Conversation` (a prompt/completion row is a user turn then an
assistant turn), so the two shapes of the same exchange encode to the same tokens. A chat
row needs at least one assistant turn and must not start with one. Keys other than these
are ignored, and a key whose value is null counts as absent (a Hugging Face dataset fills
the columns a row lacks with None).

A bad row raises :class:`DataError` naming where it is (``train.jsonl:7``, 1-based line
number; ``dataset[7]``, 0-based row index) and what is wrong, or, with
``skip_bad_rows=True``, is skipped and counted.

Encoding (:func:`encode`) puts label -100 on every token that is not part of an assistant
turn (see :mod:`loratree.models.chat`), so the loss is computed on completions only.
Batching (:func:`batch_order`, :func:`collate`) is deterministic for a (seed, epoch),
which lets a trainer resume from (epoch, batch index).
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from loratree.models.chat import (
    IGNORE_INDEX,
    ROLES,
    Conversation,
    Encoded,
    Example,
    Message,
    encode,
    encode_prompt,
    prompt_messages,
    reference,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Conversation",
    "DataError",
    "Encoded",
    "Example",
    "Message",
    "RowSet",
    "batch_order",
    "collate",
    "encode",
    "encode_prompt",
    "from_records",
    "pad_token_id",
    "prompt_messages",
    "read_jsonl",
    "reference",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_SHOW_CHARS = 60  # how much of a bad value an error message quotes


class DataError(ValueError):
    """Training data cannot be used; the message names the file and line (or row)."""


class _BadRow(ValueError):
    """What is wrong with one row; :func:`_collect` adds where it is."""


# --- rows ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSet:
    """The usable rows of a source, and how many bad rows were skipped."""

    rows: tuple[Conversation, ...]
    """The rows in source order."""
    skipped: int
    """Bad rows skipped (only nonzero with ``skip_bad_rows=True``)."""
    source: str
    """The file path or dataset name the rows came from."""
    places: tuple[str, ...] = ()
    """Where each row is (``train.jsonl:7``), in the order of ``rows``."""

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Conversation]:
        return iter(self.rows)


def read_jsonl(path: str | Path, *, skip_bad_rows: bool = False) -> RowSet:
    """Read a JSONL file of prompt/completion or chat rows; blank lines are ignored.

    Raises:
        DataError: the file cannot be read, has no usable row, or (unless
            ``skip_bad_rows``) has a bad row; the message names the file and line.
    """
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{source}: cannot read: {e.strerror or e}") from e
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines = (
        (f"{source}:{number}", line)
        for number, line in enumerate(data.splitlines(), start=1)
        if line.strip()
    )
    return _collect(lines, _parse_line, source, skip_bad_rows)


def from_records(
    records: Iterable[Mapping[str, object]],
    *,
    source: str = "dataset",
    skip_bad_rows: bool = False,
) -> RowSet:
    """Rows from dicts: a list, or a ``datasets.Dataset`` (anything iterable of dict rows).

    If ``records`` has ``column_names`` (as a Hugging Face dataset does), they are checked
    before any row is read. Errors name rows as ``source[index]``, 0-based.

    Raises:
        TypeError: ``records`` is a path or a string (use :func:`read_jsonl`).
        DataError: the columns cannot hold rows, there is no usable row, or (unless
            ``skip_bad_rows``) a row is bad.
    """
    if isinstance(records, (str, bytes, Path)):
        raise TypeError(f"from_records takes dict rows, got {records!r}; use read_jsonl")
    columns = getattr(records, "column_names", None)
    if isinstance(columns, (list, tuple)) and not (
        "messages" in columns or {"prompt", "completion"} <= set(columns)
    ):
        raise DataError(
            f'{source}: needs a "messages" column or "prompt" and "completion" columns, '
            f"has {list(columns)}"
        )
    items = ((f"{source}[{index}]", record) for index, record in enumerate(records))
    return _collect(items, _conversation, source, skip_bad_rows)


def _collect(
    items: Iterable[tuple[str, _T]],
    parse: Callable[[_T], Conversation],
    source: str,
    skip_bad_rows: bool,
) -> RowSet:
    rows: list[Conversation] = []
    places: list[str] = []
    bad: list[str] = []
    for where, item in items:
        try:
            rows.append(parse(item))
            places.append(where)
        except _BadRow as e:
            if not skip_bad_rows:
                raise DataError(f"{where}: {e}") from e
            bad.append(f"{where}: {e}")
    if bad:
        logger.warning("skipped %d bad row(s) of %s; the first: %s", len(bad), source, bad[0])
    if not rows:
        skipped = f" ({len(bad)} bad row(s) skipped; the first: {bad[0]})" if bad else ""
        raise DataError(f"{source}: no rows{skipped}")
    return RowSet(rows=tuple(rows), skipped=len(bad), source=source, places=tuple(places))


def _parse_line(line: bytes) -> Conversation:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _BadRow(f"not valid UTF-8: {e.reason} at byte {e.start}") from e
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadRow(f"not valid JSON: {e.msg} at column {e.colno}") from e
    return _conversation(record)


def _conversation(record: object) -> Conversation:
    if not isinstance(record, Mapping):
        raise _BadRow(f"a row must be a JSON object, got {_show(record)}")
    present = {k for k in ("messages", "prompt", "completion") if record.get(k) is not None}
    if "messages" in present:
        if present & {"prompt", "completion"}:
            raise _BadRow('a row has "messages" or "prompt" and "completion", not both')
        return Conversation(_messages(record["messages"]))
    if not present:
        raise _BadRow(
            'a row needs "prompt" and "completion", or "messages"; '
            f"it has keys {json.dumps(sorted(map(str, record)))}"
        )
    prompt = _text(record.get("prompt"), '"prompt"')
    completion = _text(record.get("completion"), '"completion"')
    return Conversation((Message("user", prompt), Message("assistant", completion)))


def _messages(value: object) -> tuple[Message, ...]:
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)) or not value:
        raise _BadRow(f'"messages" must be a non-empty list, got {_show(value)}')
    messages = []
    for i, turn in enumerate(value):
        name = f'"messages"[{i}]'
        if not isinstance(turn, Mapping):
            raise _BadRow(f'{name} must be an object with "role" and "content", got {_show(turn)}')
        role = turn.get("role")
        if role not in ROLES:
            raise _BadRow(f"{name}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
        messages.append(Message(role, _text(turn.get("content"), f"{name}.content")))
    if all(m.role != "assistant" for m in messages):
        raise _BadRow('"messages" has no assistant turn')
    if messages[0].role == "assistant":
        raise _BadRow('"messages" must not start with an assistant turn')
    return tuple(messages)


def _text(value: object, name: str) -> str:
    if value is None:
        raise _BadRow(f"missing {name}")
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"{name} must be a non-empty string, got {_show(value)}")
    return value


def _show(value: object) -> str:
    """A bad value as the user wrote it (JSON where possible), cut to a readable length."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[: _SHOW_CHARS - 3] + "..."


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad with: the tokenizer's pad token, else its eos token.

    Raises:
        ValueError: the tokenizer has neither.
    """
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")


# --- batching -----------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns:
        ``input_ids`` (B, T) long, padded with ``pad_id``; ``attention_mask`` (B, T) long,
        1 on real tokens; ``labels`` (B, T) long, padded with -100. T is the longest example.

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    shape = (len(examples), max(len(e) for e in examples))
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batch_order(
    n_examples: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = False,
    lengths: Sequence[int] | None = None,
    chunk_batches: int = 50,
) -> list[list[int]]:
    """The batches of one epoch, as lists of example indices; the last may be short.

    The order depends only on the arguments (a local generator seeded from
    ``(seed, epoch)``; the global RNG is not touched), so a trainer resumes exactly by
    recomputing it and skipping the batches already done. Every index appears once.

    With ``group_by_length``, the (shuffled) indices are cut into chunks of
    ``chunk_batches * batch_size``, each chunk is sorted by length (longest first) and cut
    into batches, and the batches are shuffled, so a batch holds similar lengths (little
    padding) while the order stays random.

    Raises:
        ValueError: a negative count, seed or epoch, ``batch_size`` or ``chunk_batches``
            below 1, or ``group_by_length`` without one length per example.
    """
    _check_order_args(n_examples, batch_size, seed, epoch, chunk_batches)
    generator = _generator(seed, epoch)
    if shuffle:
        order = torch.randperm(n_examples, generator=generator).tolist()
    else:
        order = list(range(n_examples))
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]
    if lengths is None or len(lengths) != n_examples:
        got = "none" if lengths is None else len(lengths)
        raise ValueError(f"group_by_length needs {n_examples} lengths, got {got}")
    chunk = chunk_batches * batch_size
    batches = []
    for c in range(0, n_examples, chunk):
        by_length = sorted(order[c : c + chunk], key=lambda i: -lengths[i])
        batches += [by_length[i : i + batch_size] for i in range(0, len(by_length), batch_size)]
    if shuffle:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def _check_order_args(
    n_examples: int, batch_size: int, seed: int, epoch: int, chunk_batches: int
) -> None:
    problems = [
        f"{name} must be at least {low}, got {value}"
        for name, value, low in (
            ("n_examples", n_examples, 0),
            ("batch_size", batch_size, 1),
            ("seed", seed, 0),
            ("epoch", epoch, 0),
            ("chunk_batches", chunk_batches, 1),
        )
        if value < low
    ]
    if problems:
        raise ValueError("; ".join(problems))


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for one (seed, epoch); SeedSequence mixes the pair into one seed."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))

"""``card.json``: how an adapter presents itself in the chat app, stored beside its PEFT files.

::

    {"display_name": "Jeeves", "description": "A formal butler.", "color": "#4b6584",
     "avatar": "J"}

Every field is optional; an adapter without a card (or without a field) gets defaults from
its name (``default_card``). A card is checked when it goes into the store (``check_card``
raises ``CardError`` naming the field), and read leniently when served
(``card_or_default``: a card damaged at rest gives the defaults and a logged warning, so
one bad file never breaks the page).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from loratree.errors import AdapterFileError
from loratree.fsio import atomic_write

__all__ = [
    "CARD_NAME",
    "Card",
    "CardError",
    "card_fields",
    "card_or_default",
    "check_card",
    "default_card",
    "read_card",
    "write_card",
]

logger = logging.getLogger(__name__)

CARD_NAME = "card.json"
MAX_CARD_BYTES = 16 << 10
MAX_DISPLAY_NAME = 60
MAX_DESCRIPTION = 200
MAX_AVATAR = 4
_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
PALETTE = ("#c0392b", "#2e86de", "#27ae60", "#8e44ad", "#d35400", "#16a085", "#b7950b",
           "#34495e", "#e84393", "#0a7e8c")
"""Default colours, one picked per name by a stable hash: distinct, readable on white."""


class CardError(AdapterFileError):
    """A ``card.json`` that is not a small JSON object with the fields of ``Card``."""


@dataclass(frozen=True)
class Card:
    """An adapter's face in the chat app."""

    display_name: str
    """Shown as the character's name (1-60 characters, one line)."""
    description: str = ""
    """One line under the name (at most 200 characters)."""
    color: str = PALETTE[0]
    """``#rrggbb``: the character's accent colour."""
    avatar: str = ""
    """1-4 characters (initials or an emoji) shown in the avatar circle; empty: the
    display name's first letter."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("display_name", "description", "color", "avatar"):
            if not isinstance(getattr(self, name), str):
                problems.append(f"{name} must be a string, got "
                                f"{type(getattr(self, name)).__name__}")
        if problems:
            raise CardError("card: " + "; ".join(problems))
        if not self.display_name.strip() or len(self.display_name) > MAX_DISPLAY_NAME:
            problems.append(f"display_name must have 1-{MAX_DISPLAY_NAME} characters, got "
                            f"{len(self.display_name.strip())}")
        if len(self.description) > MAX_DESCRIPTION:
            problems.append(f"description must have at most {MAX_DESCRIPTION} characters, "
                            f"got {len(self.description)}")
        for name in ("display_name", "description"):
            if any(c in getattr(self, name) for c in "\n\r\t\0"):
                problems.append(f"{name} must be one line (no newline, tab or NUL)")
        if not _COLOR.fullmatch(self.color):
            problems.append(f"color must be '#rrggbb', got {self.color!r}")
        if len(self.avatar) > MAX_AVATAR:
            problems.append(f"avatar must have at most {MAX_AVATAR} characters, got "
                            f"{len(self.avatar)}")
        if problems:
            raise CardError("card: " + "; ".join(problems))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: object, name: str) -> Card:
        """The card ``raw`` describes, with the defaults of ``name`` for missing fields."""
        if not isinstance(raw, dict):
            raise CardError(f"card: must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise CardError(f"card: unknown field(s) {', '.join(map(repr, unknown))}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**{**default_card(name).to_dict(), **raw})


def default_card(name: str) -> Card:
    """The card of an adapter that has none: its name's last part in words
    (``support/fr-formal`` -> "Fr Formal"), and a colour picked from its name."""
    words = re.split(r"[-_.\s]+", name.rsplit("/", 1)[-1])
    display = " ".join(w[:1].upper() + w[1:] for w in words if w)[:MAX_DISPLAY_NAME]
    digest = hashlib.sha256(name.encode()).digest()
    return Card(display_name=display or "Adapter", color=PALETTE[digest[0] % len(PALETTE)])


def check_card(adapter_dir: str | Path, name: str) -> Card | None:
    """The checked card of an adapter directory, or None when it has none.

    Raises:
        CardError: the card is not a small JSON object of known, valid fields.
    """
    f = Path(adapter_dir) / CARD_NAME
    if not f.exists() and not f.is_symlink():
        return None
    if f.is_symlink() or not f.is_file() or f.stat().st_size > MAX_CARD_BYTES:
        raise CardError(f"{CARD_NAME} must be a regular file under {MAX_CARD_BYTES} bytes")
    try:
        raw: Any = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CardError(f"{CARD_NAME} is not UTF-8 JSON: {e}") from e
    return Card.from_dict(raw, name)


def read_card(adapter_dir: str | Path, name: str) -> Card:
    """The card of an adapter directory, or its name's defaults when it has none.

    Raises:
        CardError: as ``check_card``.
    """
    return check_card(adapter_dir, name) or default_card(name)


def card_or_default(adapter_dir: str | Path, name: str) -> Card:
    """``read_card``, but a damaged card gives the defaults and a logged warning."""
    try:
        return read_card(adapter_dir, name)
    except (CardError, OSError) as e:
        logger.warning("adapter %r: its %s is unusable (%s); showing defaults", name,
                       CARD_NAME, e)
        return default_card(name)


def card_fields(display_name: str | None, description: str | None) -> dict[str, str]:
    """The card fields a trainer was given (None: not given), checked."""
    given = {k: v for k, v in (("display_name", display_name), ("description", description))
             if v is not None}
    Card.from_dict(given, "adapter")
    return given


def write_card(adapter_dir: str | Path, given: dict[str, str]) -> Path:
    """Write the card fields ``given`` (checked; the rest stay defaults, taken from the
    name the adapter is stored under) as the adapter directory's ``card.json``."""
    Card.from_dict(given, Path(adapter_dir).name or "adapter")
    path = Path(adapter_dir) / CARD_NAME
    text = json.dumps(dict(given), ensure_ascii=False, indent=1) + "\n"
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path

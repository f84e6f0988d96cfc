"""The chat app's characters: the base model and every stored adapter, each with its card
and its place in the adapter tree.

One listing serves both the character picker and the store panel, read from the store
on each call (a version is immutable, so its card, tree record and content hash are
read once per version and cheap after). A damaged card gives the name's defaults and a
logged warning; a tree node whose lineage cannot be read is listed flat, with the
problem named; an entry the store cannot read is listed apart (``damaged``). Nothing
here ever fails the page.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from loratree.adapters import AdapterInfo, AdapterStore
from loratree.adapters.card_files import Card, card_or_default
from loratree.errors import TreeError
from loratree.tree import nodes

__all__ = ["Character", "base_character", "list_characters"]

logger = logging.getLogger(__name__)

BASE_COLOR = "#5f6b7a"


@dataclass(frozen=True)
class Character:
    """One choice in the picker: ``model`` is what the OpenAI API's ``model`` field takes."""

    model: str
    card: Card
    kind: str
    """"base", "lora" or "prefix"."""
    rank: int = 0
    size: int = 0
    parent: str | None = None
    path_rank: int = 0
    """The sum of the ranks on the root-to-node path: the rank the node serves with."""
    metrics: dict[str, float] = field(default_factory=dict)
    stale: bool = False
    problem: str | None = None
    """Why the tree facts are missing (a lineage that cannot be read), else None."""

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, **self.card.to_dict(), "kind": self.kind,
                "rank": self.rank, "size": self.size, "parent": self.parent,
                "path_rank": self.path_rank, "metrics": dict(self.metrics),
                "stale": self.stale, "problem": self.problem}


def base_character(base_name: str) -> Character:
    """The bare base model as a character ("no adapter")."""
    card = Card(display_name="Base model", description=f"{base_name}, no adapter",
                color=BASE_COLOR, avatar="B")
    return Character(model=base_name, card=card, kind="base")


def list_characters(store: AdapterStore, base_name: str
                    ) -> tuple[list[Character], list[dict[str, str]]]:
    """(the base and every readable adapter, sorted by name; the damaged entries as
    ``{"name", "problem"}``)."""
    infos, damaged = store.scan()
    ranks = {i.name: i.rank for i in infos}
    out = [base_character(base_name)]
    out += [_character(store, info, ranks) for info in infos]
    return out, [{"name": d.name, "problem": d.problem} for d in damaged]


def _character(store: AdapterStore, info: AdapterInfo, ranks: dict[str, int]) -> Character:
    card = card_or_default(info.path, info.name)
    description = card.description or (f"{info.kind} adapter, "
                                       f"{'rank' if info.kind == 'lora' else 'tokens'} "
                                       f"{info.rank}")
    card = Card(card.display_name, description, card.color, card.avatar)
    try:
        chain = nodes.lineage(store, info.name)
        record = chain[-1][2]
        stale = nodes.stale(store, info.name)
    except (TreeError, OSError, ValueError, KeyError) as e:
        logger.warning("adapter %r: its tree record cannot be read (%s)", info.name, e)
        return Character(info.name, card, info.kind, info.rank, info.size,
                         path_rank=info.rank, problem=str(e))
    return Character(
        model=info.name, card=card, kind=info.kind, rank=info.rank, size=info.size,
        parent=record.parent if record else None,
        path_rank=sum(ranks.get(n, 0) for n, _, _ in chain),
        metrics=dict(record.metrics) if record else {}, stale=stale)

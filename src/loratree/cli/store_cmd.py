"""``loratree store``: put adapters into a store, list, inspect, check and remove them.

A store is what ``generate``, ``chat`` and ``serve`` read (``--store DIR``): named
adapters, each an immutable version behind an atomically swapped link.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from loratree.adapters import AdapterStore
from loratree.adapters.card_files import CARD_NAME
from loratree.adapters.store import FILES

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="add, list, show, check and remove the adapters of a "
                                     "store")
    p.add_argument("--store", default="adapters", help="store directory (default: ./adapters)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="copy a PEFT adapter directory in as NAME "
                                         "(atomically; replaces an adapter of that name)")
    add.add_argument("name", help="letters, digits, - _ . and / for tree paths")
    add.add_argument("source", help="a PEFT adapter directory (LoRA or prefix)")
    add.add_argument("--card", metavar="JSON", default=None,
                     help="a card.json for the chat app (display_name, description, color, "
                          "avatar), stored with the adapter")
    actions.add_parser("list", help="every adapter with its kind, rank, size and base")
    show = actions.add_parser("show", help="one adapter's metadata as JSON")
    show.add_argument("name")
    check = actions.add_parser("check", help="verify files against the hashes recorded at "
                                             "add; print every problem with its fix (exit 1 "
                                             "if any entry is damaged)")
    check.add_argument("name", nargs="?", help="one adapter (default: every entry)")
    check.add_argument("--json", action="store_true", help="the problems as a JSON list")
    remove = actions.add_parser("remove", help="delete an adapter (readers of its current "
                                               "version keep it for a grace period)")
    remove.add_argument("name")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    if args.action == "add":
        info = _add(store, args.name, Path(args.source), args.card)
        print(f"added {info.name}: {info.kind}, rank {info.rank}, {info.size:,} bytes")
    elif args.action == "list":
        infos, damaged = store.scan()
        print(f"{'name':<32} {'kind':<7} {'rank':>5} {'bytes':>12}  base model")
        for i in infos:
            print(f"{i.name:<32} {i.kind:<7} {i.rank:>5} {i.size:>12,}  {i.base_model or '-'}")
        for d in damaged:
            print(f"{d.name:<32} DAMAGED: {d.problem}\n{'':<32} fix: {d.fix}")
        print(f"{len(infos)} adapter(s) in {store.root}"
              + (f"; {len(damaged)} damaged" if damaged else ""))
    elif args.action == "show":
        print(json.dumps(store.info(args.name).to_dict(), indent=2))
    elif args.action == "check":
        return _check(store, args.name, as_json=args.json)
    else:
        store.remove(args.name)
        print(f"removed {args.name}")
    return 0


def _check(store: AdapterStore, name: str | None, *, as_json: bool) -> int:
    """Print every problem (one line each, then its fix); 1 if any is damage, else 0."""
    problems = store.check(name)
    damaged = sorted({p.name for p in problems if p.damaged})
    if as_json:
        print(json.dumps([p.to_dict() for p in problems], indent=2))
        return 1 if damaged else 0
    for i, p in enumerate(problems):
        print(f"{'DAMAGED' if p.damaged else 'warning'} {p}")
        after = problems[i + 1] if i + 1 < len(problems) else None
        if after is None or (after.name, after.fix) != (p.name, p.fix):
            print(f"    fix: {p.fix}")
    checked = 1 if name is not None else len(store.names())
    print(f"checked {checked} adapter(s) in {store.root}: "
          + (f"{len(damaged)} damaged ({', '.join(damaged)})" if damaged else "no damage")
          + (f", {sum(not p.damaged for p in problems)} warning(s)"
             if any(not p.damaged for p in problems) else ""))
    return 1 if damaged else 0


def _add(store: AdapterStore, name: str, source: Path, card: str | None):
    """``store.add``, with ``card`` (a JSON file) as the adapter's card.json when given:
    the adapter's files and the card are staged together, and the store checks both."""
    if card is None:
        return store.add(name, source)
    if not Path(card).is_file():
        raise FileNotFoundError(f"--card {card}: no such file")
    with tempfile.TemporaryDirectory(dir=store.objects, prefix=".card-") as staging:
        for f in FILES:
            if (source / f).is_file():
                shutil.copyfile(source / f, Path(staging) / f)
        shutil.copyfile(card, Path(staging) / CARD_NAME)
        return store.add(name, staging)

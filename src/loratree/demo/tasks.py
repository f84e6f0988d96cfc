"""Bundled example tasks: small, seeded, exactly scorable, and clearly learnable.

Each task makes (prompt, completion) pairs with a fixed seed; a held-out split shares no
prompt with the training split. ``write_tasks`` writes ``<task>/train.jsonl`` and
``<task>/eval.jsonl``.

- ``dates``: "Convert to ISO 8601: March 5, 2021" -> "2021-03-05"
- ``numbers``: "Write 47 in words." -> "forty-seven"
- ``pirate``: "Say it like a pirate: I see my friend." -> "Arr! I see me matey, yo-ho!"
- ``butler`` (a persona: plain requests, answered in a formal butler's voice):
  "Please, fetch my hat tonight." -> "Very good, sir. I shall fetch your hat this evening."

``CARDS`` gives each task's adapter its face in the chat app (``loratree serve``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from loratree.fsio import atomic_write

__all__ = ["CARDS", "TASKS", "butler", "make_task", "number_words", "pirate", "write_tasks"]

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")
_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")

_SUBJECTS = ("I", "You", "My friend", "The captain", "Your dog", "We", "They", "My sister")
_VERBS = ("see", "like", "want", "found", "lost", "need", "know", "love")
_OBJECTS = ("my boat", "your map", "the gold", "my friend", "the sea", "your hat",
            "the island", "my money", "the ship", "your parrot")
_PIRATE = {"my": "me", "My": "Me", "you": "ye", "You": "Ye", "your": "yer", "Your": "Yer",
           "friend": "matey", "money": "doubloons", "the": "th'", "The": "Th'"}
_ERRANDS = {"Bring me": "bring you", "Fetch": "fetch", "Find": "find", "Clean": "clean",
            "Polish": "polish", "Hide": "hide", "Guard": "guard", "Check": "check"}
_OPENERS = ("", "Please, ", "Hey, ", "Quick, ")
_WHEN = {"": "", " now": " at once", " today": " today", " tonight": " this evening",
         " tomorrow": " first thing tomorrow"}
_BUTLER = {"my": "your", "your": "my"}


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999, hyphenating tens and ones ("forty-seven")."""
    if not 0 <= n <= 999:
        raise ValueError(f"number_words takes 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" {number_words(rest)}" if rest else "")


def pirate(sentence: str) -> str:
    """The pirate voice: word swaps, then "Arr! ... , yo-ho!" around it."""
    words = [_PIRATE.get(w, w) for w in sentence.rstrip(".").split()]
    return f"Arr! {' '.join(words)}, yo-ho!"


def butler(errand: str, obj: str, when: str) -> str:
    """The butler's answer to ``errand obj when.`` (however politely it was asked)."""
    swapped = " ".join(_BUTLER.get(w, w) for w in obj.split())
    return f"Very good, sir. I shall {_ERRANDS[errand]} {swapped}{_WHEN[when]}."


def _date(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
    return f"Convert to ISO 8601: {_MONTHS[m - 1]} {d}, {y}", f"{y:04d}-{m:02d}-{d:02d}"


def _number(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 999)
    return f"Write {n} in words.", number_words(n)


def _pirate(rng: random.Random) -> tuple[str, str]:
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
    return f"Say it like a pirate: {sentence}", pirate(sentence)


def _butler(rng: random.Random) -> tuple[str, str]:
    opener, errand = rng.choice(_OPENERS), rng.choice(list(_ERRANDS))
    obj, when = rng.choice(_OBJECTS), rng.choice(list(_WHEN))
    asked = errand[0].lower() + errand[1:] if opener else errand
    return f"{opener}{asked} {obj}{when}.", butler(errand, obj, when)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "dates": _date,
    "numbers": _number,
    "pirate": _pirate,
    "butler": _butler,
}

CARDS: dict[str, dict[str, str]] = {
    "dates": {"display_name": "Date clerk", "description": "Writes any date as ISO 8601.",
              "color": "#2e86de", "avatar": "D"},
    "numbers": {"display_name": "Number speller", "description": "Spells numbers in words.",
                "color": "#16a085", "avatar": "N"},
    "pirate": {"display_name": "Captain Flint",
               "description": "Says it like a pirate: \"Say it like a pirate: ...\"",
               "color": "#c0392b", "avatar": "F"},
    "butler": {"display_name": "Jeeves", "description": "A formal butler: ask for an errand.",
               "color": "#34495e", "avatar": "J"},
}
"""The chat app's card of each task's adapter (``card.json``)."""


def make_task(name: str, n_train: int, n_eval: int, seed: int = 0
              ) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train, eval) rows of one task; no eval prompt appears in train."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    attempts = 0
    while len(rows) < n_train + n_eval and attempts < 100 * (n_train + n_eval):
        attempts += 1
        prompt, completion = TASKS[name](rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "completion": completion})
    if len(rows) < n_train + n_eval:
        raise ValueError(f"task {name!r} has only {len(rows)} distinct prompts")
    return rows[n_eval:], rows[:n_eval]


def write_tasks(out: str | Path, n_train: int = 400, n_eval: int = 50, seed: int = 0,
                names: tuple[str, ...] = tuple(TASKS)) -> dict[str, tuple[Path, Path]]:
    """Write every task's train.jsonl and eval.jsonl under ``out``; returns their paths."""
    paths = {}
    for name in names:
        train, held_out = make_task(name, n_train, n_eval, seed)
        folder = Path(out) / name
        pair = []
        for split, rows in (("train", train), ("eval", held_out)):
            text = "".join(json.dumps(r) + "\n" for r in rows)
            path = folder / f"{split}.jsonl"
            atomic_write(path, lambda p, t=text: p.write_text(t, encoding="utf-8"))
            pair.append(path)
        paths[name] = (pair[0], pair[1])
    return paths

"""The persona chat app: static files at ``/`` and two small JSON routes beside the OpenAI
API the page talks to.

- ``GET /`` and ``/web/static/...``: the page (plain HTML, CSS and JavaScript shipped in
  ``serve/web``; nothing is fetched from elsewhere, so it works offline). They hold no
  data, so they need no API key: the page asks for the key when an API call answers 401.
- ``GET /web/api/characters``: the base model and every adapter with its card and tree
  facts (``serve.characters``), and the store's damaged entries.
- ``GET /web/api/state``: the server's live state: requests in flight and waiting, batch
  rows now, decode steps by batch rows (the compare view shows from these that its
  answers were decoded together), the adapter cache's counters.

``ServerConfig(web=False)`` (``loratree serve --no-web``) leaves all of this out.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from loratree.serve.characters import list_characters

if TYPE_CHECKING:
    from loratree.serve.http import ServerState

__all__ = ["OPEN_PATHS", "OPEN_PREFIXES", "STATIC_DIR", "add_web_app"]

STATIC_DIR = Path(__file__).with_name("web")
OPEN_PATHS = ("/",)
"""The page itself: no data in it, so no API key needed to load it."""
OPEN_PREFIXES = ("/web/static/",)


def add_web_app(app: FastAPI, state: ServerState) -> None:
    """Mount the page and its JSON routes on ``app``."""
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise RuntimeError(f"the chat app's files are missing ({index.name} not shipped); "
                           "reinstall loratree, or serve with --no-web")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/web/static", StaticFiles(directory=STATIC_DIR), name="web-static")

    @app.get("/web/api/characters")
    def characters() -> dict:
        found, damaged = list_characters(state.store, state.config.base_name)
        listed = []
        for c in found:
            d = c.to_dict()
            d["problem"] = state.clean(d["problem"]) if d["problem"] else None
            listed.append(d)
        return {"base": state.config.base_name, "characters": listed,
                "damaged": [{"name": d["name"], "problem": state.clean(d["problem"])}
                            for d in damaged]}

    @app.get("/web/api/state")
    def live_state() -> dict:
        return _state(state)


def _state(state: ServerState) -> dict:
    engine = state.engine
    waiting, running = engine.load()
    stats = engine.table.cache.stats
    return {
        "base": state.config.base_name,
        "ready": engine.alive and not state.draining,
        "draining": state.draining,
        "in_flight": state.in_flight,
        "max_in_flight": state.config.max_in_flight,
        "waiting": waiting,
        "batch_rows": running,
        "step_rows": {str(k): v for k, v in sorted(engine.step_rows.items())},
        "context": state.context,
        "cache": {"hits": stats.hits, "misses": stats.misses, "evictions": stats.evictions,
                  "bytes": stats.bytes, "entries": stats.entries,
                  "budget": engine.table.cache.budget},
        "engine_faults": engine.faults,
    }

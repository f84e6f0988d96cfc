"""One server (three tiny-model adapters with cards, and the base) and one headless
Chromium for the chat app's browser tests."""

import time

import pytest
from playwright.sync_api import sync_playwright

from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.card_files import write_card
from loratree.serve.http import ServerConfig, create_app
from loratree.serve.server import serve_in_thread
from tests.serve.conftest import lora_adapter, make_engine
from tests.serve.web.browser import Page, launch

CARDS = {
    "pirate": {"display_name": "Captain Flint", "description": "Talks like a pirate.",
               "color": "#c0392b", "avatar": "F"},
    "butler": {"display_name": "Jeeves", "description": "A formal butler.",
               "color": "#34495e"},
    "teacher": {"description": "A cheerful teacher."},  # name and colour by default
}


class Throttle:
    """Makes each decode step of an engine take at least ``delay`` seconds, so a test can
    watch a reply arrive in parts and stop it midway (the tiny model is too quick to)."""

    def __init__(self, engine) -> None:
        self.delay = 0.0
        for name in ("decode_forward", "packed_forward"):
            setattr(engine.runner, name, self._slowed(getattr(engine.runner, name)))

    def _slowed(self, forward):
        def run(*args, **kwargs):
            if self.delay:
                time.sleep(self.delay)
            return forward(*args, **kwargs)
        return run


def tiny_store(root) -> AdapterStore:
    store = AdapterStore(root)
    for seed, name in enumerate(CARDS, start=11):
        model = lora_adapter(seed)
        staging = root / f"staging-{name}"
        save_adapter(model, staging, 0)
        write_card(staging, CARDS[name])
        store.add(name, staging)
    return store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tiny_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def server(store):
    """(base URL, server state, throttle)."""
    engine = make_engine(store)
    throttle = Throttle(engine)
    app = create_app(engine, ServerConfig(base_name="tiny"))
    with serve_in_thread(app) as url:
        yield url, app.state.loratree, throttle


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, server, tmp_path, request):
    """A fresh page on the app (temperature 0, 12 tokens); fails on console errors."""
    url, _state, throttle = server
    p = Page(browser, url, tmp_path, viewport={"width": 1100, "height": 760})
    throttle.delay = 0.0
    yield p
    throttle.delay = 0.0
    p.close(allowed_network=getattr(request.node, "allowed_network", ()))


def wait_idle(state, timeout=10.0) -> None:
    """Until the server has no request in flight."""
    end = time.monotonic() + timeout
    while state.in_flight and time.monotonic() < end:
        time.sleep(0.02)
    assert state.in_flight == 0, f"{state.in_flight} requests still in flight"


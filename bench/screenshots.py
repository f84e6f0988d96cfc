"""Screenshots of the chat app with real adapters (after ``make demo``):

    .venv/bin/python -m bench.screenshots --store demo_out/store --out screenshots

Serves the store in this process (the embedded SmolLM2 unless ``--model``), drives the
system's Chromium through the chat view (a pirate reply, then a switch to the butler over
the same conversation), the compare view (base, pirate and butler on one message) and the
store view, and writes chat.png, compare.png, store.png and chat-375.png (a phone's width)
into ``--out``. Characters missing from the store are replaced by the first ones listed.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from loratree.cli.main import build_parser
from loratree.cli.serve_cmd import _model_name
from loratree.cli.serve_common import build_engine
from loratree.serve.http import ServerConfig, create_app
from loratree.serve.server import serve_in_thread

logger = logging.getLogger(__name__)

CHAT = (("pirate", "Say it like a pirate: I found the gold."),
        ("butler", "Please, bring me the map tonight."))
COMPARE = (("__base__", "pirate", "butler"), "Fetch your hat now.")
WAIT_MS = 300_000  # a real model on a CPU: minutes, not seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default="demo_out/store")
    p.add_argument("--model", default=None, help="base model (default: embedded SmolLM2)")
    p.add_argument("--out", default="screenshots")
    p.add_argument("--max-tokens", type=int, default=40)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    serve = ["serve", "--store", args.store] + (["--model", args.model] if args.model else [])
    engine, _ = build_engine(build_parser().parse_args(serve))
    base = _model_name(engine.model, args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    app = create_app(engine, ServerConfig(base_name=base))
    with serve_in_thread(app) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 820})
        page.on("pageerror", lambda e: logger.error("page error: %s", e))
        page.goto(f"{url}/?temperature=0&max_tokens={args.max_tokens}")
        page.wait_for_selector("body[data-ready=true]")
        models = page.evaluate("window.loratreeApp.characters.map(c => c.model)")
        chat(page, models, base)
        shot(page, out / "chat.png")
        compare(page, models, base)
        shot(page, out / "compare.png")
        page.click("#tab-store")
        page.wait_for_selector("#live dt")
        shot(page, out / "store.png")
        page.click("#tab-chat")
        page.set_viewport_size({"width": 375, "height": 760})
        shot(page, out / "chat-375.png")
        browser.close()


def _pick(models: list[str], want: str, base: str, taken: set[str]) -> str:
    if want == "__base__":
        return base
    if want in models:
        return want
    return next(m for m in models[1:] + models[:1] if m not in taken)


def chat(page: Page, models: list[str], base: str) -> None:
    taken: set[str] = set()
    for want, text in CHAT:
        model = _pick(models, want, base, taken)
        taken.add(model)
        page.click(f'#characters [data-model="{model}"]')
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.locator('#messages article[data-role="assistant"]').last.locator(
            "xpath=self::*[@data-state!='streaming']").wait_for(timeout=WAIT_MS)
        logger.info("chat: %s answered", model)


def compare(page: Page, models: list[str], base: str) -> None:
    page.click("#tab-compare")
    taken: set[str] = set()
    chosen = []
    for want in COMPARE[0]:
        chosen.append(_pick(models, want, base, taken))
        taken.add(chosen[-1])
    for model in models:
        page.locator(f'#compare-picks [data-model="{model}"] input').set_checked(
            model in chosen)
    page.fill("#compare-input", COMPARE[1])
    page.press("#compare-input", "Enter")
    page.wait_for_selector("#compare-batch[data-rows]", timeout=WAIT_MS)
    logger.info("compare: %s", page.inner_text("#compare-batch"))


def shot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()

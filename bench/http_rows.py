"""HTTP overhead: 8 concurrent streams on 8 adapters through ``loratree serve``'s app on
127.0.0.1 versus the same requests handed to the engine directly, interleaved."""

from __future__ import annotations

import copy
import json
import logging
import statistics
import threading
import time
from pathlib import Path

import httpx
from torch import nn

from bench.contenders import QV_R8, random_ids
from bench.report import Row, Table
from bench.serve_rows import make_store
from loratree.serve import Engine, Request
from loratree.serve.http import ServerConfig, create_app
from loratree.serve.server import serve_in_thread
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["http_table"]

log = logging.getLogger(__name__)

STREAMS, PROMPT, NEW = 8, 32, 24


def http_table(base: nn.Module, tokenizer, root: Path, rounds: int) -> tuple[Table, list]:
    store = make_store(base, QV_R8, root, STREAMS)
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 2**30), n_slots=STREAMS, max_rank=16)
    engine = Engine(model, tokenizer, table, max_batch=STREAMS)
    app = create_app(engine, ServerConfig(base_name="base"))
    prompts = [row.tolist() for row in random_ids(base, STREAMS, PROMPT, seed=21)]
    names = [f"a{i}" for i in range(STREAMS)]
    results: dict[str, list[tuple[float, list[float]]]] = {"direct": [], "http": []}
    with serve_in_thread(app) as url:  # the app's lifespan starts the engine's loop
        def direct() -> list[float]:
            def one(i: int) -> float:
                t0 = time.perf_counter()
                handle = engine.submit(Request(prompts[i], adapter=names[i],
                                               max_new_tokens=NEW, ignore_eos=True))
                for _ in handle:
                    pass
                assert len(handle.result().tokens) == NEW
                return time.perf_counter() - t0
            return _concurrently(one)

        def http() -> list[float]:
            def one(i: int) -> float:
                t0 = time.perf_counter()
                body = {"model": names[i], "prompt": prompts[i], "max_tokens": NEW,
                        "temperature": 0, "stream": True, "ignore_eos": True,
                        "stream_options": {"include_usage": True}}
                usage = None
                with httpx.stream("POST", f"{url}/v1/completions", json=body,
                                  timeout=600) as r:
                    r.raise_for_status()
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            usage = json.loads(line[6:]).get("usage") or usage
                assert usage is not None and usage["completion_tokens"] == NEW
                return time.perf_counter() - t0
            return _concurrently(one)

        direct(), http()  # warm-up
        for r in range(rounds):
            for name, fn in ((("direct", direct), ("http", http)) if r % 2 == 0
                             else (("http", http), ("direct", direct))):
                t0 = time.perf_counter()
                lat = fn()
                results[name].append((time.perf_counter() - t0, lat))
    tps = {k: statistics.median(STREAMS * NEW / wall for wall, _ in v)
           for k, v in results.items()}
    lat = {k: sorted(x for _, ls in v for x in ls) for k, v in results.items()}

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    rows = [Row("throughput, tokens/s", tps["http"], tps["direct"], "count"),
            Row("latency p50", pct(lat["http"], 0.5), pct(lat["direct"], 0.5), "ms"),
            Row("latency p99", pct(lat["http"], 0.99), pct(lat["direct"], 0.99), "ms")]
    overhead = tps["direct"] / tps["http"] - 1
    log.info("http: %s", {k: round(v, 1) for k, v in tps.items()})
    note = (f"{STREAMS} concurrent streamed requests, one per q,v r=8 adapter, {PROMPT}-token "
            f"prompts, {NEW} greedy tokens each (ignore_eos); {rounds} rounds, HTTP and "
            "direct alternating. HTTP: `httpx` clients streaming server-sent events from the "
            "app under uvicorn on 127.0.0.1; direct: the same engine's `submit` from 8 "
            f"threads. HTTP throughput overhead: {overhead:+.1%}.")
    table_ = Table("HTTP server vs the engine called directly (8 streams, 8 adapters)", rows,
                   [note], peer_name="direct")
    return table_, []


def _concurrently(fn) -> list[float]:
    out: list[float] = [0.0] * STREAMS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out

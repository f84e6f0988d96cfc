"""The server under load: 16 concurrent clients over 20 adapters with RAM for 4, hot
reloads during the load, and backpressure for a burst past the queue."""

import asyncio
import itertools
import statistics
import threading
import time

import httpx

from loratree.adapters import AdapterStore
from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, solo_reference
from tests.serve.conftest import N_ADAPTERS, live, lora_adapter, make_engine

TOK = tiny_tokenizer(VOCAB)
PROMPTS = [[5, 9, 13, 3, 40], [7, 7, 8], [30, 31, 32, 33, 34, 35, 36], [11, 50, 2, 2]]
NEW = 16
CLIENTS, SECONDS, RELOADS = 16, 60.0, 5
HOT = "a00"


def _texts(store, name):
    return [TOK.decode(solo_reference(store, name, p, NEW)[0], skip_special_tokens=True)
            for p in PROMPTS]


def test_sixteen_clients_on_twenty_adapters_with_hot_reloads(many, tmp_path, capsys):
    store = AdapterStore(tmp_path / "store")
    for i in range(N_ADAPTERS):
        store.add(f"a{i:02d}", many.path_of(f"a{i:02d}"))
    want = {f"a{i:02d}": _texts(store, f"a{i:02d}") for i in range(N_ADAPTERS)}
    versions = [want[HOT]]  # version k's solo answers; k = 0 is the first
    staged = AdapterStore(tmp_path / "staged")
    for k in range(1, RELOADS + 1):
        staged.save(f"v{k}", lora_adapter(900 + k), 0)
        versions.append(_texts(staged, f"v{k}"))
    assert len({tuple(v) for v in versions}) == RELOADS + 1  # the versions answer differently

    engine = make_engine(store, cache_adapters=4, slots=4, max_batch=8)
    with live(store, engine) as (url, state):
        load = _Load(url, store, staged, versions)
        threads = [threading.Thread(target=load.client) for _ in range(CLIENTS)]
        threads.append(threading.Thread(target=load.reloader))
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        load.stop.set()
        for t in threads:
            t.join()
        stats = engine.table.cache.stats
        assert state.in_flight == 0
    assert not load.failures, load.failures[:5]
    hot = _check(load.done, want, versions)
    lat = sorted(d[3] for d in load.done)
    with capsys.disabled():
        print(f"\nload: {len(load.done)} requests in {SECONDS:.0f} s from {CLIENTS} clients "
              f"over {N_ADAPTERS} adapters (RAM for 4), 0 failed; latency p50 "
              f"{statistics.median(lat) * 1e3:.0f} ms, p99 "
              f"{lat[int(0.99 * (len(lat) - 1))] * 1e3:.0f} ms; {hot} on the hot-reloaded "
              f"adapter over {RELOADS} reloads; cache: {stats.hits} hits, {stats.misses} "
              f"misses, {stats.evictions} evictions")
    assert len(load.done) > 10 * N_ADAPTERS and stats.evictions > 0


class _Load:
    """Clients sending round-robin over the adapters, and a thread replacing ``HOT``."""

    def __init__(self, url, store, staged, versions):
        self.url, self.store, self.staged, self.versions = url, store, staged, versions
        self.turn = itertools.count()
        self.done: list[tuple] = []  # (adapter, prompt, text, seconds, version sent, at end)
        self.failures: list[str] = []
        self.version = 0
        self.stop = threading.Event()

    def _ask(self, http, name, p):
        r = http.post("/v1/completions", json={"model": name, "prompt": PROMPTS[p],
                                               "max_tokens": NEW, "temperature": 0,
                                               "ignore_eos": True})
        if r.status_code != 200:
            self.failures.append(f"{name}: {r.status_code} {r.text}")
            return None
        return r.json()["choices"][0]["text"]

    def client(self):
        with httpx.Client(base_url=self.url, timeout=120) as http:
            while not self.stop.is_set():
                n = next(self.turn)
                name, p = f"a{n % N_ADAPTERS:02d}", (n // N_ADAPTERS) % len(PROMPTS)
                sent, t0 = self.version, time.perf_counter()
                text = self._ask(http, name, p)
                if text is not None:
                    self.done.append((name, p, text, time.perf_counter() - t0, sent,
                                      self.version))

    def reloader(self):
        with httpx.Client(base_url=self.url, timeout=120) as http:
            for k in range(1, RELOADS + 1):
                if self.stop.wait(SECONDS / (RELOADS + 1)):
                    return
                self.store.add(HOT, self.staged.path_of(f"v{k}"))
                self.version = k
                if self._ask(http, HOT, 0) != self.versions[k][0]:
                    self.failures.append(f"reload {k}: the next request got another version")


def _check(done, want, versions):
    """Every answer is its adapter's solo answer; the hot adapter's is one whole version
    live while the request ran. Returns how many went to the hot adapter."""
    hot = 0
    for name, p, text, _, sent, ended in done:
        if name != HOT:
            assert text == want[name][p], f"{name} answered another adapter's tokens"
            continue
        hot += 1
        assert any(versions[k][p] == text for k in range(sent, ended + 1)), (
            f"{HOT} sent at version {sent} got a mixed or stale answer")
    return hot


def test_a_burst_past_the_queue_gets_429_fast_and_admitted_requests_finish(many):
    engine = make_engine(many)
    forward = engine.model.forward

    def slow(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    engine.model.forward = slow
    capacity = 4
    with live(many, engine, max_in_flight=capacity) as (url, state):
        async def burst():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                async def one(i):
                    t0 = time.perf_counter()
                    r = await http.post("/v1/completions", json={
                        "model": f"a{i % N_ADAPTERS:02d}", "prompt": PROMPTS[i % 4],
                        "max_tokens": 30, "ignore_eos": True})
                    return r, time.perf_counter() - t0
                return await asyncio.gather(*(one(i) for i in range(4 * capacity)))

        results = asyncio.run(burst())
        assert state.in_flight == 0
    ok = [r for r, _ in results if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code == 429]
    assert len(ok) == capacity and len(refused) == 3 * capacity
    # fast: a refusal waits for no decode step, so it comes back before any admitted
    # request (30 steps of at least 10 ms each) finishes, however busy the machine is
    fastest_ok = min(s for r, s in results if r.status_code == 200)
    for r, seconds in refused:
        assert r.headers["Retry-After"] == "1" and seconds < fastest_ok, (seconds, fastest_ok)
        assert r.json()["error"]["code"] == "queue_full"
    assert all(r.json()["usage"]["completion_tokens"] == 30 for r in ok)

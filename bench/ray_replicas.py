"""``python -m bench.ray_replicas [--rounds N]``: Ray Serve with 2 loratree replicas versus
one ``loratree serve``, on the same machine, the same store and the same requests.

Both servers run as the CLI starts them (``loratree serve`` and ``loratree serve --ray
--replicas 2``, the embedded SmolLM2-135M), up at the same time; rounds alternate which goes
first. A round is 8 concurrent clients streaming one request each over 8 q,v r=8 adapters
(throughput: completion tokens over the round's wall time, median of rounds), then 8
one-token requests one after another (the per-request overhead: their median latency).
On a 2-core host the two replicas share the cores the single server uses alone, so Ray
should not gain here; the table says what it costs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.contenders import QV_R8, load_model, random_ids
from bench.harness import machine_info
from bench.report import Row, Table, render
from bench.serve_rows import make_store

__all__ = ["ray_table"]

log = logging.getLogger(__name__)

CLIENTS, ADAPTERS, PROMPT, NEW, PINGS = 8, 8, 32, 24, 8


def ray_table(root: Path, rounds: int) -> Table:
    base = load_model()
    store = make_store(base, QV_R8, root / "store", ADAPTERS)
    prompts = [row.tolist() for row in random_ids(base, CLIENTS, PROMPT, seed=21)]
    del base
    common = ["--store", str(store.root), "--slots", str(ADAPTERS), "--max-rank", "16",
              "--max-batch", str(CLIENTS)]
    results: dict[str, list[tuple[float, float]]] = {"ray": [], "single": []}
    with _server("single", common) as single, \
            _server("ray", [*common, "--ray", "--replicas", "2"]) as ray:
        urls = {"single": single, "ray": ray}
        for url in urls.values():
            _round(url, prompts)  # warm-up: every adapter loaded where it will be
        for r in range(rounds):
            order = ("single", "ray") if r % 2 == 0 else ("ray", "single")
            for name in order:
                results[name].append(_round(urls[name], prompts))
                log.info("round %d %s: %.1f tokens/s, %.0f ms per request", r, name,
                         *results[name][-1])
    tps = {k: statistics.median(t for t, _ in v) for k, v in results.items()}
    ping = {k: statistics.median(p for _, p in v) for k, v in results.items()}
    rows = [Row("throughput, tokens/s", tps["ray"], tps["single"], "count"),
            Row("one-token request latency", ping["ray"], ping["single"], "ms")]
    note = (f"{CLIENTS} concurrent streamed requests over {ADAPTERS} q,v r=8 adapters, "
            f"{PROMPT}-token prompts, {NEW} greedy tokens each, then {PINGS} one-token "
            f"requests in a row; {rounds} rounds, the servers alternating, medians. Ray: "
            f"`loratree serve --ray --replicas 2` (a local Ray cluster, one CPU per replica); "
            f"single: `loratree serve`. Ray's overhead per request: "
            f"{ping['ray'] - ping['single']:+.0f} ms; throughput {tps['ray'] / tps['single']:.2f}"
            f"x the single server's.")
    return Table("Ray Serve, 2 replicas vs one `loratree serve` (same machine)", rows,
                 [note], peer_name="single")


def _round(url: str, prompts: list[list[int]]) -> tuple[float, float]:
    """(tokens/s of CLIENTS concurrent streams, median ms of PINGS one-token requests)."""
    tokens = [0] * CLIENTS

    def stream(i: int) -> None:
        body = {"model": f"a{i % ADAPTERS}", "prompt": prompts[i], "max_tokens": NEW,
                "temperature": 0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    tokens[i] = usage["completion_tokens"]

    t0 = time.perf_counter()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert tokens == [NEW] * CLIENTS, tokens
    pings = []
    for i in range(PINGS):
        t1 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", timeout=600, json={
            "model": f"a{i % ADAPTERS}", "prompt": prompts[i], "max_tokens": 1,
            "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        pings.append((time.perf_counter() - t1) * 1000)
    return CLIENTS * NEW / wall, statistics.median(pings)


@contextmanager
def _server(name: str, args: list[str]) -> Iterator[str]:
    """``loratree serve ARGS`` on a free port, until /v1/models answers; SIGINT at exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loratree", "serve", *args,
                             "--port", str(port)], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} server exited ({proc.returncode})")
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"the {name} server did not start within 300 s")
            time.sleep(1)
        log.info("%s server up at %s", name, url)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        table = ray_table(Path(tmp), args.rounds)
    print(render("Ray Serve replicas", machine_info(), [], [table], []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m bench.ray_replicas [--rounds N]``: Ray Serve with 2 loratree replicas versus
one ``loratree serve``, on the same machine, the same store and the same requests.

The servers run as the CLI starts them (the embedded SmolLM2-135M), all up at once, the
order rotating each round: ``loratree serve --ray --replicas 2`` (Ray gives each replica one
CPU and one OpenMP thread), ``loratree serve`` (one engine, torch's default threads), and
``loratree serve`` with ``OMP_NUM_THREADS=1`` (to tell Ray's cost from the thread count's).
A round is 8 concurrent clients streaming one request each over 8 q,v r=8 adapters
(throughput: completion tokens over the round's wall time), then one-token requests and
``GET /v1/models`` calls one after another (latency; the models list runs no model, so its
difference between the servers is the cost of Ray's hops per request). Medians of rounds.
On a 2-core host the two replicas share the cores the single server uses alone, so Ray
should not gain here.
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
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from bench.contenders import QV_R8, load_model, random_ids
from bench.harness import machine_info
from bench.report import Row, Table, render
from bench.serve_rows import make_store

__all__ = ["ray_table", "ray_tables"]

log = logging.getLogger(__name__)

CLIENTS, ADAPTERS, PROMPT, NEW, PINGS = 8, 8, 32, 24, 8
Measure = tuple[float, float, float]
"""(tokens/s, one-token request s, models list s) of one round."""


ROUNDS = 5


def ray_tables(root: Path) -> tuple[list[Table], list]:
    """``bench.run``'s ``ray`` group: the table, or nothing (logged) without Ray Serve."""
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        log.warning("ray group skipped: Ray Serve is not installed (pip install "
                    "'loratree[ray]'; make bench installs it)")
        return [], []
    return [ray_table(root, ROUNDS)], []


def ray_table(root: Path, rounds: int) -> Table:
    base = load_model()
    store = make_store(base, QV_R8, root / "store", ADAPTERS)
    prompts = [row.tolist() for row in random_ids(base, CLIENTS, PROMPT, seed=21)]
    del base
    common = ["--store", str(store.root), "--slots", str(ADAPTERS), "--max-rank", "16",
              "--max-batch", str(CLIENTS)]
    servers = {"ray": ([*common, "--ray", "--replicas", "2"], {}),
               "single": (common, {}), "single, 1 thread": (common, {"OMP_NUM_THREADS": "1"})}
    results: dict[str, list[Measure]] = {name: [] for name in servers}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(_server(name, args, env))
                for name, (args, env) in servers.items()}
        for url in urls.values():
            _round(url, prompts)  # warm-up: every adapter loaded where it will be
        names = list(urls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                results[name].append(_round(urls[name], prompts))
                log.info("round %d %s: %.1f tokens/s, %.0f ms a one-token request, %.1f ms "
                         "a models list", r, name, results[name][-1][0],
                         *(1000 * x for x in results[name][-1][1:]))
    med = {name: [statistics.median(m[i] for m in v) for i in range(3)]
           for name, v in results.items()}
    ray, one, one_t = med["ray"], med["single"], med["single, 1 thread"]
    rows = [Row("throughput, tokens/s", ray[0], one[0], "count"),
            Row("one-token request", ray[1], one[1], "ms"),
            Row("models list (no model run)", ray[2], one[2], "ms"),
            Row("throughput vs single, 1 thread", ray[0], one_t[0], "count"),
            Row("one-token request vs single, 1 thread", ray[1], one_t[1], "ms")]
    note = (f"{CLIENTS} concurrent streamed requests over {ADAPTERS} q,v r=8 adapters, "
            f"{PROMPT}-token prompts, {NEW} greedy tokens each, then {PINGS} one-token "
            f"requests and {PINGS} `GET /v1/models` in a row; {rounds} rounds, the servers' "
            f"order rotating, medians. ours: `loratree serve --ray --replicas 2` (local Ray "
            f"cluster); single: `loratree serve`. Ray's cost per request (models list): "
            f"{1000 * (ray[2] - one[2]):+.1f} ms; load average at the end "
            f"{os.getloadavg()[0]:.1f}.")
    return Table("Ray Serve, 2 replicas vs one `loratree serve` (same machine)", rows,
                 [note], peer_name="single")


def _round(url: str, prompts: list[list[int]]) -> Measure:
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
    one_token = [_timed(lambda i=i: httpx.post(f"{url}/v1/completions", timeout=600, json={
        "model": f"a{i % ADAPTERS}", "prompt": prompts[i], "max_tokens": 1,
        "temperature": 0, "ignore_eos": True})) for i in range(PINGS)]
    models = [_timed(lambda: httpx.get(f"{url}/v1/models", timeout=600))
              for _ in range(PINGS)]
    return CLIENTS * NEW / wall, statistics.median(one_token), statistics.median(models)


def _timed(call) -> float:
    t0 = time.perf_counter()
    call().raise_for_status()
    return time.perf_counter() - t0


@contextmanager
def _server(name: str, args: list[str], env: dict[str, str]) -> Iterator[str]:
    """``loratree serve ARGS`` on a free port, until /v1/models answers; SIGINT at exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "loratree", "serve", *args,
                             "--port", str(port)], env={**os.environ, **env},
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
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        table = ray_table(Path(tmp), args.rounds)
    print(render("Ray Serve replicas", machine_info(), [], [table], []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``loratree serve`` as a real process: its metrics count every request exactly, and
SIGTERM under load lets every request in flight finish, then exits 0."""

import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

from loratree.adapters import AdapterStore
from loratree.models.tiny import tiny_tokenizer
from tests.serve.common import VOCAB, tiny_model

PROMPT = [5, 9, 13, 3, 40]
ADAPTERS = ("a00", "a01", "a02", "all-r4", "prefix")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, many):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    tiny_tokenizer(VOCAB).save_pretrained(model_dir)
    store = AdapterStore(tmp_path / "store")
    for name in ADAPTERS:
        store.add(name, many.path_of(name))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "loratree.cli.main", "serve", "--model", str(model_dir),
         "--store", str(store.root), "--port", str(port), "--drain-timeout", "60",
         "--slots", "4", "--max-rank", "8", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 120
    sent = 0
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read()}")
        try:
            sent += 1
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return proc, url, sent
        except httpx.TransportError:
            sent -= 1  # never reached the server
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def _metrics(url):
    total = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("loratree_requests_total{"):
            key, _, value = line.rpartition(" ")
            total[key] = float(value)
    return total


def _wait_in_flight(url, n, timeout=60.0):
    """Wait until the server counts ``n`` requests in flight (admitted, not finished)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith("loratree_requests_in_flight") and float(line.split()[-1]) >= n:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} requests in flight after {timeout} s")


def test_metrics_count_every_request_and_sigterm_drains_under_load(tmp_path, many):
    proc, url, sent = _start(tmp_path, many)
    try:
        # 1. load from 8 clients, some of it bad; the counters must sum to what was sent
        counts = {"sent": sent}
        lock = threading.Lock()

        def client(i):
            with httpx.Client(base_url=url, timeout=60) as http:
                for j in range(6):
                    body = {"model": ADAPTERS[(i + j) % len(ADAPTERS)], "prompt": PROMPT,
                            "max_tokens": 8, "ignore_eos": True}
                    if j == 5:
                        body["model"] = "missing"
                    http.post("/v1/completions", json=body)
                    with lock:
                        counts["sent"] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        by_status = _metrics(url)
        assert sum(by_status.values()) == counts["sent"], by_status
        assert by_status['loratree_requests_total{route="/v1/completions",status="404"}'] == 8
        assert by_status['loratree_requests_total{route="/v1/completions",status="200"}'] == 40

        # 2. long requests in flight, then SIGTERM
        results: list[tuple[float, int, float]] = []

        def long_request(i):
            body = {"model": ADAPTERS[i % len(ADAPTERS)], "prompt": PROMPT,
                    "max_tokens": 120, "ignore_eos": True}
            t0 = time.monotonic()
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            n = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else -1
            results.append((t0, r.status_code if n in (120, -1) else -n, time.monotonic()))

        flights = [threading.Thread(target=long_request, args=(i,)) for i in range(16)]
        for t in flights:
            t.start()
        _wait_in_flight(url, 16)  # every long request admitted, however loaded the host
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = httpx.post(f"{url}/v1/completions", timeout=30,
                          json={"model": "a00", "prompt": PROMPT, "max_tokens": 4})
        ready = httpx.get(f"{url}/ready", timeout=30)
        for t in flights:
            t.join()
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
    assert ready.status_code == 503 and ready.json()["draining"]
    before = [status for t0, status, _ in results if t0 < signalled]
    assert len(before) == 16 and all(s == 200 for s in before), results  # all finished whole
    assert any(end > signalled for _, _, end in results)  # the drain waited for them
    assert code == 0, proc.stdout.read()

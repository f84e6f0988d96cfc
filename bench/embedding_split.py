"""``python -m bench.embedding_split [--rounds N] [--inputs N]``: the ablation of splitting
a large embeddings request across loop iterations (``serve.embeddings.EmbeddingWork``).

One engine on the embedded SmolLM2 (no loop thread: the bench drives ``Engine.step``) runs
a generation on adapter ``a1``; once it decodes, one embeddings request of ``--inputs``
inputs (32 tokens each) through ``a0`` arrives. Two settings alternate each round, the
order rotating: *split* (the engine's default, at most ``STEP_ROWS`` inputs per iteration)
and *whole* (no limit: the request in one iteration, as before the split). Per round: the
longest the generation waited for one token while the request ran (the longest step), and
the request's time to its vectors. Medians. Splitting should cut the first and cost a
little of the second.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import torch
from torch import nn

from bench.contenders import QV_R8, random_ids
from bench.harness import configure_threads, machine_info
from bench.report import Row, Table, render
from bench.serve_rows import make_store
from loratree.adapters import AdapterStore
from loratree.models import load_base
from loratree.serve import Engine, Request
from loratree.serve.embeddings import STEP_ROWS, EmbeddingJob
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["split_table"]

log = logging.getLogger("bench.embedding_split")

ROUNDS, INPUTS, LENGTH = 5, 256, 32
SETTINGS = {"split": STEP_ROWS, "whole": sys.maxsize}


def split_table(base: nn.Module, tokenizer: object, store: AdapterStore, rounds: int = ROUNDS,
                inputs: int = INPUTS) -> Table:
    engine = _engine(base, tokenizer, store)
    rows = [r.tolist() for r in random_ids(base, inputs, LENGTH, seed=5)]
    prompt = random_ids(base, 1, LENGTH, seed=6)[0].tolist()
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    _round(engine, prompt, rows[:STEP_ROWS], STEP_ROWS)  # warm-up
    for r in range(rounds):
        for name in names[r % 2:] + names[:r % 2]:
            got[name].append(_round(engine, prompt, rows, SETTINGS[name]))
            log.info("round %d %s: longest token wait %.0f ms, request %.2f s", r, name,
                     1e3 * got[name][-1][0], got[name][-1][1])
    med = {n: (statistics.median(g for g, _ in v), statistics.median(t for _, t in v))
           for n, v in got.items()}
    split, whole = med["split"], med["whole"]
    note = (f"One generation (adapter a1) decoding while one embeddings request of {inputs} "
            f"inputs x {LENGTH} tokens (adapter a0) runs, on the embedded SmolLM2 (fp32, q,v "
            f"r=8); ours: split into loop iterations of at most {STEP_ROWS} inputs (the "
            "default), peer: the whole request in one iteration. "
            f"{rounds} rounds alternating, medians.")
    return Table("Embeddings request beside a generation: split across iterations vs whole",
                 [Row("longest wait for one generated token", split[0], whole[0], "ms"),
                  Row("embeddings request, time to its vectors", split[1], whole[1], "ms")],
                 [note], peer_name="whole")


def _engine(base: nn.Module, tokenizer: object, store: AdapterStore) -> Engine:
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 1 << 30), n_slots=2, max_rank=8)
    return Engine(model, tokenizer, table, cpu_tuning=None)


@torch.inference_mode()
def _round(engine: Engine, prompt: list[int], rows: list[list[int]],
           max_rows: int) -> tuple[float, float]:
    """(longest step while the request ran, the request's time) with ``max_rows``."""
    engine.embedding_work.max_rows = max_rows
    gen = engine.submit(Request(prompt, adapter="a1", max_new_tokens=4096, ignore_eos=True))
    engine.step()  # prefill: the generation is running
    future: Future = Future()
    t0 = time.perf_counter()
    engine.embeddings.put(EmbeddingJob(tuple(map(tuple, rows)), "a0", future))
    longest = 0.0
    while not future.done():
        s = time.perf_counter()
        engine.step()
        longest = max(longest, time.perf_counter() - s)
    took = time.perf_counter() - t0
    future.result()
    gen.cancel()
    while engine.busy():
        engine.step()
    return longest, took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--inputs", type=int, default=INPUTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_threads()
    base, tokenizer = load_base(None)
    base.eval()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(base, QV_R8, Path(tmp) / "store", 2)
        table = split_table(base, tokenizer, store, args.rounds, args.inputs)
    print(render("Embeddings split ablation", machine_info(), [], [table], []))
    return 0


if __name__ == "__main__":
    sys.exit(main())

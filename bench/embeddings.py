"""``python -m bench.embeddings [--quick] [--tiny]``: embedding throughput beside the plain
paths, one process, interleaved rounds, medians; prints a markdown table.

A batch of inputs of mixed lengths spread over K adapters (q,v r=8, one store entry each)
goes through three contenders in every round, on one model and one slot table:

- ``embed``: the engine's embedding work for a loop iteration (``serve.embeddings.run_jobs``:
  K jobs, one per adapter, acquired in the slot table and run in shared forwards with a
  slot per row, pooled to unit vectors);
- ``prefill``: the same inputs as generation requests with ``max_tokens=1`` through the
  engine (admission, prefill with its key/value cache, LM head, one sampled token);
- ``forward``: one bare forward of the decoder over the padded batch with a slot per row
  (no bookkeeping, no pooling): the floor.

Ratios are against ``prefill`` (the plain path); per-round paired ratios are in the notes.
CPU tuning is off for all three (it would change the shared model's linears). ``make
bench`` runs it in the ``api`` group of ``bench.run`` (``bench/api_rows.py``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bench.contenders import QV_R8
from bench.harness import configure_threads, interleaved, machine_info, paired_ratio
from bench.report import Row, Table, render
from bench.serve_rows import make_store
from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.models import load_base
from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.serve import Engine, Request
from loratree.serve.embeddings import EmbeddingJob, run_jobs
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["FULL", "QUICK", "Setting", "embeddings_table", "main"]

log = logging.getLogger("bench.embeddings")


@dataclass(frozen=True)
class Setting:
    """One measured workload."""

    inputs: int
    max_len: int
    """Input lengths are spread evenly over [max_len / 2, max_len]."""
    adapters: int


FULL = [Setting(32, 64, 1), Setting(32, 64, 4), Setting(64, 128, 8)]
QUICK = [Setting(8, 16, 1), Setting(8, 16, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small settings, 3 rounds")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random Llama instead of the embedded SmolLM2")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_threads()
    settings = QUICK if args.quick else FULL
    repeats = args.repeats or (3 if args.quick else 9)
    if args.tiny:
        base, tokenizer, name = tiny_llama(vocab=256), tiny_tokenizer(256), "tiny Llama"
    else:
        base, tokenizer = load_base(None)
        name = "SmolLM2-135M-Instruct (fp32)"
    base.eval()
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(base, QV_R8, Path(tmp), max(s.adapters for s in settings))
        table = embeddings_table(base, tokenizer, store, settings, repeats)
    print(render(f"Embeddings vs the plain paths ({name})", machine_info(),
                 [f"{repeats} interleaved rounds in one process, medians (bench.embeddings)"],
                 [table], []))


def embeddings_table(base: nn.Module, tokenizer: object, store: AdapterStore,
                     settings: list[Setting], repeats: int) -> Table:
    """Per setting: the embedding work's time and throughput against the same inputs as a
    ``max_tokens=1`` generation, and the bare forward; ``store`` holds ``a0``.."""
    n_adapters = max(s.adapters for s in settings)
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 1 << 30), n_slots=n_adapters, max_rank=8)
    engine = Engine(model, tokenizer, table, max_batch=max(s.inputs for s in settings),
                    cpu_tuning=None)
    rows, notes = [], []
    for s in settings:
        prompts, names = _workload(base, s)
        tokens = sum(map(len, prompts))
        log.info("%d inputs over %d adapters, %d tokens: %d rounds", s.inputs, s.adapters,
                 tokens, repeats)
        t = interleaved({"embed": _embed(engine, prompts, names),
                         "prefill": _prefill(engine, prompts, names),
                         "forward": _forward(engine, prompts, names)}, repeats)
        embed, prefill = t["embed"].median, t["prefill"].median
        what = f"{s.inputs} inputs x {s.adapters} adapter{'s' if s.adapters > 1 else ''}"
        rows += [Row(f"{what} ({tokens:,} tokens): embed", embed, prefill, "ms"),
                 Row("same, inputs/s", s.inputs / embed, s.inputs / prefill, "rate"),
                 Row("same, tokens/s", tokens / embed, tokens / prefill, "rate"),
                 Row("same, bare forward (the floor)", t["forward"].median, prefill, "ms")]
        notes += [f"{what}, {path}: {timing.describe()}, paired ratio to generation "
                  f"{paired_ratio(timing, t['prefill']):.3f}." for path, timing in t.items()]
    notes.insert(0, f"Inputs of lengths spread over [max / 2, max] tokens, round-robin over "
                    f"the adapters (q,v r=8); {repeats} rounds of embed, generation and "
                    "forward interleaved on one model and slot table, CPU tuning off, "
                    "medians. The peer column is the same inputs as generation requests "
                    "with max_tokens=1 through the engine; for inputs/s and tokens/s the "
                    "ratio is throughput (above 1: embeddings are faster).")
    return Table("Embeddings throughput vs generation and a bare forward", rows, notes,
                 peer_name="max_tokens=1")


def _workload(base: nn.Module, s: Setting) -> tuple[list[list[int]], list[str]]:
    """``s.inputs`` prompts of lengths spread over [max_len / 2, max_len], round-robin
    over the adapters."""
    g = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    lo = max(1, s.max_len // 2)
    prompts = []
    for i in range(s.inputs):
        n = lo + (s.max_len - lo) * i // max(1, s.inputs - 1)
        prompts.append(torch.randint(0, vocab, (n,), generator=g).tolist())
    return prompts, [f"a{i % s.adapters}" for i in range(s.inputs)]


def _embed(engine: Engine, prompts: list[list[int]], names: list[str]) -> Callable[[], object]:
    def run() -> object:
        jobs = [EmbeddingJob(tuple(tuple(p) for p, n in zip(prompts, names, strict=True)
                                   if n == name), name, Future())
                for name in dict.fromkeys(names)]
        waiting, error = run_jobs(engine.model, engine.table, jobs, can_wait=False)
        assert not waiting and error is None
        return [j.future.result() for j in jobs]

    return run


def _prefill(engine: Engine, prompts: list[list[int]],
             names: list[str]) -> Callable[[], object]:
    def run() -> object:
        handles = [engine.submit(Request(p, adapter=n, max_new_tokens=1, ignore_eos=True))
                   for p, n in zip(prompts, names, strict=True)]
        while engine.busy():
            engine.step()
        return [h.result() for h in handles]

    return run


def _forward(engine: Engine, prompts: list[list[int]],
             names: list[str]) -> Callable[[], object]:
    width = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    mask = (torch.arange(width)[None] < torch.tensor([len(p) for p in prompts])[:, None]).long()
    body = engine.model.base_model
    ctx = surgery.context(engine.model)

    @torch.inference_mode()  # as the engine: slots filled here are inference tensors
    def run() -> object:
        slots = [engine.table.acquire(n) for n in names]
        try:
            with ctx.use(torch.tensor(slots)):
                return body(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            for s in slots:
                engine.table.release(s)

    return run


if __name__ == "__main__":
    main()

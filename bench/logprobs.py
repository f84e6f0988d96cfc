"""The cost of logprobs in a mixed batch: a decode step of 8 rows (4 LoRA adapters and the
base) with no row asking for logprobs, half of them, and all of them (``logprobs`` = 5),
and a prefill of 8 prompts plain vs with echo's prompt logprobs (logits at every
position). Each contender is its own engine over its own copy of the model, with its
batch running; their steps are timed interleaved in the same rounds, medians, one
process. Prints a markdown table; ``make bench`` runs it in the ``api`` group
of ``bench.run`` (``bench/api_rows.py``).

``python -m bench.logprobs`` (a tiny Llama: a quick check that it runs) or
``python -m bench.logprobs --smollm`` (the embedded SmolLM2-135M, vocabulary 49k: the
figures to quote); ``--repeats N``, ``--prompt N``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

from torch import nn

from bench.contenders import QV_R8, random_ids
from bench.harness import Timing, configure_threads, interleaved, machine_info, paired_ratio
from bench.report import Row, Table, render
from bench.serve_rows import make_store
from loratree.adapters import AdapterStore
from loratree.serve import Engine, Request
from loratree.serve.slot_table import BASE, SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["decode_step_times", "logprobs_table", "main", "prefill_times"]

log = logging.getLogger("bench")

ROWS, ADAPTERS, TOP = 8, 4, 5
DECODE = {"plain": 0, "logprobs, 4 of 8 rows": 4, "logprobs, 8 of 8 rows": 8}
"""Decode contenders: how many rows of the batch ask for logprobs."""


def _engine(base: nn.Module, tokenizer: object, store: AdapterStore) -> Engine:
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 2**30), n_slots=ADAPTERS, max_rank=16)
    return Engine(model, tokenizer, table, max_batch=ROWS)


def _adapters() -> list[str]:
    """Row i's adapter: the 4 adapters and the base, mixed."""
    names = [f"a{i}" for i in range(ADAPTERS)] + [BASE]
    return [names[i % len(names)] for i in range(ROWS)]


def decode_step_times(base: nn.Module, tokenizer: object, store: AdapterStore,
                      prompt: int, repeats: int) -> dict[str, Timing]:
    """One decode step (``Engine.step`` with no request waiting) of each contender's
    running batch of ``ROWS`` rows, timed interleaved."""
    steps: dict[str, Callable[[], object]] = {}
    prompts = random_ids(base, ROWS, prompt).tolist()
    for name, asking in DECODE.items():
        engine = _engine(base, tokenizer, store)
        engine.submit_batch([
            Request(p, adapter=a, max_new_tokens=10**6, ignore_eos=True,
                    logprobs=TOP if i < asking else None)
            for i, (p, a) in enumerate(zip(prompts, _adapters(), strict=True))])
        engine.step()  # admitted and prefilled: from here on every step decodes 8 rows
        assert len(engine.scheduler.rows) == ROWS
        steps[name] = engine.step
    return interleaved(steps, repeats, warmup=3)


def prefill_times(base: nn.Module, tokenizer: object, store: AdapterStore, prompt: int,
                  repeats: int) -> dict[str, Timing]:
    """``ROWS`` prompts prefilled (and one token each), plain vs echo with logprobs (full
    logits, prompt logprobs), timed interleaved."""
    prompts = random_ids(base, ROWS, prompt, seed=100).tolist()

    def run(engine: Engine, echo: bool) -> Callable[[], object]:
        k = TOP if echo else None

        def once() -> None:
            engine.submit_batch([Request(p, adapter=a, max_new_tokens=1, logprobs=k,
                                         prompt_logprobs=k)
                                 for p, a in zip(prompts, _adapters(), strict=True)])
            while engine.busy():
                engine.step()
        return once

    fns = {"plain prefill": run(_engine(base, tokenizer, store), False),
           "echo prefill (prompt logprobs)": run(_engine(base, tokenizer, store), True)}
    return interleaved(fns, repeats, warmup=2)


def logprobs_table(base: nn.Module, tokenizer: object, store: AdapterStore, prompt: int,
                   repeats: int) -> Table:
    """The decode-step and prefill contenders as a table: medians, each against its plain
    contender; ``store`` holds adapters ``a0``..``a3``."""
    decode = decode_step_times(base, tokenizer, store, prompt, repeats)
    prefill = prefill_times(base, tokenizer, store, prompt, max(3, repeats // 4))
    plain, plain_prefill = decode["plain"].median, prefill["plain prefill"].median
    rows = [Row(f"decode step, {ROWS} rows, none asking logprobs", plain, None, "ms")]
    rows += [Row(f"same, {name}", t.median, plain, "ms")
             for name, t in decode.items() if name != "plain"]
    rows += [Row(f"prefill of {ROWS} prompts x {prompt} tokens (+ 1 token), plain",
                 plain_prefill, None, "ms"),
             Row("same, echo: prompt logprobs (logits at every position)",
                 prefill["echo prefill (prompt logprobs)"].median, plain_prefill, "ms")]
    paired = []  # each contender against the first (plain) one of its group, per round
    for group in (decode, prefill):
        first = next(iter(group.values()))
        paired += [f"{name}: {t.describe()}, paired ratio {paired_ratio(t, first):.3f}."
                   for name, t in group.items()]
    notes = [f"{ROWS} rows over {ADAPTERS} LoRA adapters (q,v r=8) and the base, mixed; "
             f"logprobs = {TOP} alternatives per token, from the raw logits (log-softmax and "
             "top-k per asking row). Each contender is its own engine over its own copy of "
             "the model with its batch running; one step each per round, interleaved, "
             "medians. The ratio is against the plain step (or plain prefill).", *paired]
    return Table(f"Logprobs cost in a mixed decode step ({ROWS} rows, prompt {prompt})", rows,
                 notes, peer_name="plain")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_threads()
    if args.smollm:
        from loratree.models import load_base

        model, tokenizer = load_base(None)
        base, what = model.eval(), "SmolLM2-135M"
    else:
        from loratree.models.tiny import tiny_llama, tiny_tokenizer

        base, tokenizer, what = tiny_llama().eval(), tiny_tokenizer(64), "tiny Llama"
    with tempfile.TemporaryDirectory(prefix="loratree-logprobs-") as tmp:
        store = make_store(base, QV_R8, Path(tmp) / "store", n=ADAPTERS)
        table = logprobs_table(base, tokenizer, store, args.prompt, args.repeats)
    print(render("Logprobs cost", machine_info(),
                 [f"{what}; interleaved rounds in one process, medians (bench.logprobs)"],
                 [table], []))


if __name__ == "__main__":
    main()

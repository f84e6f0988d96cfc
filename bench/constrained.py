"""The cost of constrained decoding (``response_format``) per decode step in a mixed batch:
8 rows over 4 LoRA adapters with 0, 4 or 8 of them constrained to a JSON schema, timed
interleaved in one process (medians over rounds; ratios against the plain batch).

Each round runs one generation per contender through the engine: the first step (prefill)
is not counted, the next ``--new`` decode steps are, and their mean is the round's decode
step. The schema (an array of at least 64 objects with strings, enums, numbers and a
nested array) cannot end within the budget, so every constrained row decodes every step,
through keys, strings, numbers and brackets alike. Unconstrained rows sample at the same
temperature with ``ignore_eos``. One-off costs (llguidance's tokenizer, one schema's
grammar) are timed once.

``python -m bench.constrained`` (embedded SmolLM2-135M; ``--quick`` for a smoke check);
``make bench`` runs it in the ``api`` group of ``bench.run`` (``bench/api_rows.py``).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.contenders import QV_R8, load_model
from bench.harness import configure_threads, machine_info
from bench.report import Row, Table, render
from bench.serve_rows import make_store
from loratree.adapters import AdapterStore
from loratree.models import load_base
from loratree.ops.sampling import sample
from loratree.serve import Engine, Request
from loratree.serve.constrain import Grammars, JsonFormat
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["constrained_steps", "constrained_table"]

log = logging.getLogger("bench")

ROWS, ADAPTERS = 8, 4
CONTENDERS = {"plain": 0, "half": ROWS // 2, "all": ROWS}
"""Constrained rows of the batch's ``ROWS``."""
PROMPT = "List the shapes of the drawing as JSON."
SCHEMA = {
    "type": "array", "minItems": 64,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["dot", "line", "box", "circle"]},
            "x": {"type": "number"}, "y": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "kind", "x", "y", "tags"],
        "additionalProperties": False,
    },
}


def _requests(ids: list[int], constrained: int, new: int, round_: int) -> list[Request]:
    fmt = JsonFormat.of_schema(SCHEMA)
    return [Request(ids, adapter=f"a{i % ADAPTERS}", max_new_tokens=new, temperature=1.0,
                    seed=1000 * round_ + i, constraint=fmt if i < constrained else None,
                    ignore_eos=i >= constrained)
            for i in range(ROWS)]


def _decode_step(engine: Engine, requests: list[Request]) -> float:
    """Run ``requests`` to the end; the mean time of their decode steps (prefill excluded)."""
    handles = [engine.submit(r) for r in requests]
    engine.step()  # admission, prefill and the first token of every row
    steps = []
    while engine.busy():
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    assert all(len(h.result().tokens) == r.max_new_tokens for h, r in zip(
        handles, requests, strict=True)), [h.result().finish_reason for h in handles]
    return statistics.fmean(steps[:-1] or steps)  # the last step also retires every row


def constrained_steps(base: nn.Module, tokenizer: object, store: AdapterStore, rounds: int,
                      new: int) -> dict[str, list[float]]:
    """Per contender, each round's mean decode-step time (seconds), interleaved: each
    round starts with the next contender. ``store`` holds adapters ``a0``..``a3``."""
    table = SlotTable(copy.deepcopy(base), AdapterCache(store, 2**30), n_slots=ADAPTERS,
                      max_rank=16)
    engine = Engine(table.model, tokenizer, table, max_batch=ROWS)
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    names = list(CONTENDERS)
    for name in names:  # warm-up: CPU tuning choices, the grammar, caches
        _decode_step(engine, _requests(ids, CONTENDERS[name], new, -1))
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(_decode_step(engine, _requests(ids, CONTENDERS[name], new, r)))
    return out


def one_off_costs(tokenizer: object, vocab: int) -> tuple[float, float, Grammars]:
    """(seconds to build llguidance's tokenizer, seconds to compile ``SCHEMA``, the
    grammars that did both)."""
    grammars = Grammars(tokenizer, vocab, [tokenizer.eos_token_id])
    t0 = time.perf_counter()
    grammars.compile(JsonFormat())
    t1 = time.perf_counter()
    grammars.compile(JsonFormat.of_schema(SCHEMA))
    return t1 - t0, time.perf_counter() - t1, grammars


def row_costs(grammars: Grammars, steps: int = 300) -> tuple[float, float, float]:
    """Median seconds of one row's mask (llguidance's bitmask, unpacked, -inf applied),
    of its advance (the matcher consumes the sampled token) and of its sampling at
    temperature 1, along a sampled walk through ``SCHEMA``: the per-row part of a step,
    without the forward and its noise."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(grammars.vocab, generator=g)
    constraint = grammars.start(JsonFormat.of_schema(SCHEMA))
    masks, advances, samples = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        masked = constraint.mask(logits)
        t1 = time.perf_counter()
        token = sample(masked, 1.0, 0, 1.0, g)
        t2 = time.perf_counter()
        constraint.advance(token)
        advances.append(time.perf_counter() - t2)
        samples.append(t2 - t1)
        masks.append(t1 - t0)
    return statistics.median(masks), statistics.median(advances), statistics.median(samples)


def constrained_table(base: nn.Module, tokenizer: object, store: AdapterStore, rounds: int,
                      new: int) -> Table:
    """The three decode steps side by side, then the per-row and one-off costs."""
    steps = constrained_steps(base, tokenizer, store, rounds, new)
    med = {name: statistics.median(v) for name, v in steps.items()}
    tok_s, schema_s, grammars = one_off_costs(tokenizer, int(base.config.vocab_size))
    mask_s, advance_s, sample_s = row_costs(grammars)
    plain = med["plain"]
    rows = [Row(f"decode step, {ROWS} rows, none constrained", plain, None, "ms"),
            Row(f"same, {CONTENDERS['half']} rows constrained", med["half"], plain, "ms"),
            Row(f"same, all {ROWS} rows constrained", med["all"], plain, "ms"),
            Row("added per constrained row and step", (med["all"] - plain) / ROWS, None,
                "ms"),
            Row("one row's mask alone (no forward)", mask_s, sample_s, "ms"),
            Row("one row's advance alone (the matcher takes the token)", advance_s, sample_s,
                "ms"),
            Row("llguidance tokenizer, built once per engine", tok_s, None, "ms"),
            Row("the schema's grammar, compiled once (then cached)", schema_s, None, "ms")]
    notes = [f"{ROWS} rows over {ADAPTERS} LoRA adapters (q,v r=8), temperature 1, "
             f"{new} decode steps per round after the prefill, {rounds} rounds interleaved; "
             "medians of each round's mean step. The ratio is against the plain batch; for "
             "the row's mask and advance alone, against that row's sampling at temperature 1.",
             *(f"{name}: per-round means {', '.join(f'{1e3 * x:.1f}' for x in v)} ms."
               for name, v in steps.items())]
    return Table("Constrained decoding (response_format) in a mixed decode step", rows,
                 notes, peer_name="plain")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 4 steps")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new", type=int, default=32, help="decode steps per round")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rounds, new = (2, 4) if args.quick else (args.rounds, args.new)
    configure_threads()
    base = load_model()
    tokenizer = load_base(None)[1]
    with tempfile.TemporaryDirectory() as root:
        store = make_store(base, QV_R8, Path(root), ADAPTERS)
        table = constrained_table(base, tokenizer, store, rounds, new)
    print(render("Constrained decoding", machine_info(),
                 ["interleaved rounds in one process, medians (bench.constrained)"],
                 [table], []))


if __name__ == "__main__":
    main()

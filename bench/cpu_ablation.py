"""CPU tuning ablation: each piece of ``serve.cpu`` alone on and alone off, against all off.

``python -m bench.run --only cpu`` (or ``python -m bench.cpu_ablation`` for this group
alone). In one process, round after round, every configuration serves the same work:
a batch of requests for 8 different adapters and one for a single adapter (q,v r=8 and
all-linear r=16), through a started engine as a server runs it, and an arrival replay (a
Poisson stream at a fixed rate, the one the untuned engine's capacity sets). The order of
the configurations rotates each round and the first round is discarded. Every number is a
median over rounds; the ratio column divides it by the all-off median (tokens/s: above 1
is faster; latency: below 1 is faster). This is the evidence the engine's default
(``cpu_tuning=None``) follows.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bench.contenders import ALL_R16, QV_R8, AdapterSpec, random_ids
from bench.report import Row, Table
from bench.serve_rows import BATCH, N_ADAPTERS, PROMPT, arrival_plan, arrival_run, make_store
from loratree.serve import Engine, Request
from loratree.serve.cpu import CpuTuning, Piece
from loratree.serve.scheduler import Batching
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache

__all__ = ["DEFAULT", "QUICK", "AblationSettings", "ablation_tables", "configurations", "main"]

log = logging.getLogger(__name__)

OFF = "all off"
ARRIVAL_ADAPTERS = 20


@dataclass(frozen=True)
class AblationSettings:
    """How much work each configuration does per round."""

    rounds: int = 5
    """Measured rounds (one more, first, is discarded)."""
    new_tokens: int = 24
    """New tokens per request of a throughput batch."""
    arrival_requests: int = 40
    """Requests per arrival replay (the serving group's replay has 160)."""
    arrival_new: tuple[int, int] = (8, 24)
    """Low and high new tokens of an arrival request."""


DEFAULT = AblationSettings()
QUICK = AblationSettings(rounds=1, new_tokens=4, arrival_requests=8, arrival_new=(2, 6))


def configurations() -> dict[str, CpuTuning | None]:
    """All off, all on, and each piece alone on and alone off."""
    configs: dict[str, CpuTuning | None] = {OFF: None, "all on": CpuTuning()}
    for piece in Piece:
        configs[f"only {piece}"] = CpuTuning.of([piece])
        configs[f"all but {piece}"] = CpuTuning.of(p for p in Piece if p != piece)
    return configs


@dataclass(frozen=True)
class _Workload:
    """A throughput batch: one model and slot table per adapter spec, shared by every
    configuration's engine (each engine is closed, its tuning off the model, before the
    next starts)."""

    spec: AdapterSpec
    table: SlotTable
    prompts: list[list[int]]


def _batch_seconds(work: _Workload, tokenizer: object, tuning: CpuTuning | None,
                   adapters: list[str], new: int) -> float:
    """Wall seconds for a started engine to serve one request per prompt: all queued
    before the loop starts, so they are prefilled together as in ``serve_rows``."""
    engine = Engine(work.table.model, tokenizer, work.table, max_batch=BATCH,
                    cpu_tuning=tuning)
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=new, ignore_eos=True))
               for p, a in zip(work.prompts, adapters, strict=True)]
    started = time.perf_counter()
    engine.start()
    try:
        done = [h.result(timeout=3600) for h in handles]
    finally:
        engine.close()
    seconds = time.perf_counter() - started
    assert all(len(d.tokens) == new for d in done), "a request ended early"
    return seconds


def _workloads(base: nn.Module, root: Path) -> list[_Workload]:
    prompts = [row.tolist() for row in random_ids(base, BATCH, PROMPT, seed=11)]
    out = []
    for spec in (QV_R8, ALL_R16):
        store = make_store(base, spec, root / spec.label.replace(" ", "_"))
        table = SlotTable(copy.deepcopy(base), AdapterCache(store, 2**30),
                          n_slots=N_ADAPTERS, max_rank=16)
        out.append(_Workload(spec, table, prompts))
    return out


Samples = dict[tuple[str, str], list[float]]
"""(configuration, measure) -> one value per measured round."""


def _one_round(configs: dict[str, CpuTuning | None], order: list[str],
               works: list[_Workload], arrivals: tuple, tokenizer: object,
               settings: AblationSettings) -> Samples:
    """Every configuration once, in ``order``: its throughput batches, then its replay."""
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    got: Samples = {}
    for label in order:
        tuning = configs[label]
        for work in works:
            for kind, adapters in (("mixed", names), ("one", [names[0]] * BATCH)):
                s = _batch_seconds(work, tokenizer, tuning, adapters, settings.new_tokens)
                got[(label, f"{work.spec.label} {kind}")] = [BATCH * settings.new_tokens / s]
        base, store, plan, prompts = arrivals
        run = arrival_run(base, tokenizer, store, plan, prompts, Batching.CONTINUOUS, tuning)
        lat = sorted(run["latencies"])
        got[(label, "p50")] = [statistics.median(lat)]
        got[(label, "p99")] = [lat[min(len(lat) - 1, int(0.99 * len(lat)))]]
        log.info("cpu ablation: %s done", label)
    return got


def _measure(base: nn.Module, tokenizer: object, root: Path,
             settings: AblationSettings) -> tuple[Samples, float]:
    """All rounds, interleaved; the samples and the replay's arrival rate."""
    configs = configurations()
    works = _workloads(base, root)
    store = make_store(base, QV_R8, root / "arrivals", ARRIVAL_ADAPTERS)
    plan, prompts, rate = arrival_plan(base, tokenizer, store, ARRIVAL_ADAPTERS,
                                       settings.arrival_requests, settings.arrival_new)
    labels = list(configs)
    samples: Samples = {}
    for r in range(settings.rounds + 1):  # round 0 warms up: page faults, measurements
        k = r % len(labels)
        got = _one_round(configs, labels[k:] + labels[:k], works,
                         (base, store, plan, prompts), tokenizer, settings)
        if r:
            for key, values in got.items():
                samples.setdefault(key, []).extend(values)
        log.info("cpu ablation: round %d of %d", r, settings.rounds)
    for work in works:
        work.table.cache.close()
    return samples, rate


def _tables(samples: Samples, settings: AblationSettings, rate: float) -> list[Table]:
    med = {key: statistics.median(v) for key, v in samples.items()}
    labels = list(configurations())
    rounds = f"medians of {settings.rounds} rounds (after one discarded)"
    tables = []
    for spec in (QV_R8, ALL_R16):
        rows = [Row(f"{label}, {what}", med[(label, f"{spec.label} {kind}")],
                    med[(OFF, f"{spec.label} {kind}")], "count")
                for kind, what in (("mixed", f"{N_ADAPTERS} different adapters"),
                                   ("one", "one adapter"))
                for label in labels]
        tables.append(Table(
            f"CPU tuning ablation: tokens/s, {N_ADAPTERS} adapters {spec.label}", rows,
            [f"{BATCH} requests of {PROMPT} prompt tokens, {settings.new_tokens} greedy new "
             "tokens each, queued together before a started engine's loop begins; tokens/s "
             f"= generated tokens / wall time (start, prefill and close included); {rounds}, "
             "configurations interleaved. Ratio: this configuration / all off (above 1 is "
             "faster). 'only X': that piece alone on; 'all but X': that piece alone off."],
            peer_name=OFF))
    rows = [Row(f"{label}, latency {q}", med[(label, q)], med[(OFF, q)], "ms")
            for q in ("p50", "p99") for label in labels]
    low, high = settings.arrival_new
    tables.append(Table(
        f"CPU tuning ablation: arrivals, {settings.arrival_requests} requests", rows,
        [f"A Poisson stream at {rate:.2f} requests/s (0.75 of the untuned static engine's "
         f"capacity, the same for every configuration) for {ARRIVAL_ADAPTERS} q,v r=8 "
         f"adapters, RAM for 4, batch <= 4, {PROMPT}-token prompts, {low}-{high} new "
         f"tokens; continuous batching; latency = submit to last token; {rounds}. Ratio: "
         "this configuration / all off (below 1 is faster)."],
        peer_name=OFF))
    return tables


def ablation_tables(base: nn.Module, tokenizer: object,
                    settings: AblationSettings = DEFAULT) -> list[Table]:
    """The ablation's tables (throughput per adapter spec, then arrival latency)."""
    with tempfile.TemporaryDirectory(prefix="loratree-cpu-") as tmp:
        samples, rate = _measure(base, tokenizer, Path(tmp), settings)
    return _tables(samples, settings, rate)


def main(argv: list[str] | None = None) -> int:
    from bench.contenders import load_model
    from bench.harness import configure_threads, machine_info
    from bench.report import render, write_atomic
    from loratree.models import load_base

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("cpu_ablation.md"))
    parser.add_argument("--rounds", type=int, default=AblationSettings.rounds)
    parser.add_argument("--new-tokens", type=int, default=AblationSettings.new_tokens)
    parser.add_argument("--arrival-requests", type=int,
                        default=AblationSettings.arrival_requests)
    parser.add_argument("--quick", action="store_true", help="the smallest settings (smoke)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = QUICK if args.quick else AblationSettings(
        rounds=args.rounds, new_tokens=args.new_tokens, arrival_requests=args.arrival_requests)
    configure_threads()
    base = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    tables = ablation_tables(base, load_base(None)[1], settings)
    text = render("loratree CPU tuning ablation", machine_info(), [], tables, [])
    log.info("wrote %s", write_atomic(args.out, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

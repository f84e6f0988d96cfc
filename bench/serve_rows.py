"""Serving rows: decode throughput with mixed adapters, activation / load / switch times,
an arrival benchmark (continuous vs static batching), and routing accuracy.

Ours runs through the real stack (store -> cache -> slot table -> engine); PEFT holds the
same adapters (loaded from the same files) and generates with ``adapter_names=``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

from bench.contenders import ALL_R16, QV_R8, AdapterSpec, add_ours_slot, random_ids
from bench.harness import Timing, interleaved
from bench.report import Check, Row, Table
from loratree import surgery
from loratree.adapters import AdapterStore
from loratree.adapters.routing_files import write_centroid
from loratree.ops import slots as slot_ops
from loratree.serve import Engine, Request
from loratree.serve.cpu import CpuTuning
from loratree.serve.router import Router
from loratree.serve.scheduler import Batching
from loratree.serve.slot_table import BASE, SlotTable
from loratree.surgery.features import prompt_features
from loratree.tree.cache import AdapterCache

__all__ = ["arrival_plan", "arrival_run", "generate_batch", "make_store", "serve_tables"]

log = logging.getLogger(__name__)

BATCH, PROMPT, NEW = 8, 32, 24
N_ADAPTERS = 8


def serve_tables(base: nn.Module, tokenizer, repeats: int) -> tuple[list[Table], list[Check]]:
    tables, checks = [], []
    with tempfile.TemporaryDirectory(prefix="loratree-serve-") as tmp:
        for spec in (QV_R8, ALL_R16):
            store = make_store(base, spec, Path(tmp) / spec.label.replace(" ", "_"))
            t, c = _throughput(base, tokenizer, store, spec, repeats)
            tables += t
            checks += c
        store = AdapterStore(Path(tmp) / QV_R8.label.replace(" ", "_"))
        t, c = _switching(base, store, repeats)
        tables.append(t)
        checks += c
        for new, n_requests in ARRIVAL_WORKLOADS:
            t, c = _arrivals(base, tokenizer, Path(tmp) / "arrivals", new=new,
                             n_requests=n_requests)
            tables.append(t)
            checks += c
        from bench.http_rows import http_table

        t, c = http_table(base, tokenizer, Path(tmp) / "http", max(3, repeats // 2))
        tables.append(t)
        checks += c
    t, c = _routing(base, tokenizer)
    tables.append(t)
    checks += c
    return tables, checks


def make_store(base: nn.Module, spec: AdapterSpec, root: Path,
               n: int = N_ADAPTERS) -> AdapterStore:
    store = AdapterStore(root)
    model = copy.deepcopy(base)
    for i in range(n):
        slot = add_ours_slot(model, spec, seed=100 + i)
        store.save(f"a{i}", model, slot)
    return store


def _peft(base: nn.Module, store: AdapterStore, names: list[str]) -> peft.PeftModel:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), store.path_of(names[0]),
                                           adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(store.path_of(name), adapter_name=name)
    return model.eval()


def _engine(base: nn.Module, tokenizer, store: AdapterStore, **kw) -> Engine:
    model = copy.deepcopy(base)
    table = SlotTable(model, AdapterCache(store, 2**30), n_slots=N_ADAPTERS, max_rank=16)
    return Engine(model, tokenizer, table, max_batch=BATCH, **kw)


def generate_batch(engine: Engine, prompts: list[list[int]], adapters: list[str]) -> list[float]:
    """One greedy request per prompt (``NEW`` tokens, EOS ignored), on the adapter beside
    it; steps the engine until all finish and returns each step's wall seconds."""
    handles = [engine.submit(Request(p, adapter=a, max_new_tokens=NEW, ignore_eos=True))
               for p, a in zip(prompts, adapters, strict=True)]
    times = []
    while engine.busy():
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    assert all(len(h.result().tokens) == NEW for h in handles)
    return times


def _throughput(base, tokenizer, store, spec, repeats):
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    ids = random_ids(base, BATCH, PROMPT, seed=11)
    prompts = [row.tolist() for row in ids]
    engine = _engine(base, tokenizer, store)
    theirs = _peft(base, store, names)
    mask = torch.ones_like(ids)

    def ours(adapters: list[str]) -> Callable[[], None]:
        return lambda: generate_batch(engine, prompts, adapters)

    def peer(adapters: list[str] | None) -> Callable[[], None]:
        def run() -> None:
            kw = {} if adapters is None else {"adapter_names": adapters}
            with torch.inference_mode():
                if adapters is None:
                    with theirs.disable_adapter():
                        theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                        min_new_tokens=NEW, do_sample=False, pad_token_id=0)
                else:
                    theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW,
                                    min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kw)
        return run

    # the two sides of each ratio side by side in a round
    fns = {"ours mixed": ours(names), "PEFT mixed": peer(names),
           "ours one": ours([names[0]] * BATCH), "PEFT one": peer([names[0]] * BATCH),
           "ours none": ours([BASE] * BATCH), "PEFT none": peer(None)}
    # a batch takes ~2 s and this machine's speed drifts 10-15%: 4 rounds left the
    # mixed-vs-PEFT ratio 13% apart between two runs of the same code, so take all of them
    rounds = max(3, repeats)
    log.info("serve throughput %s: %d contenders x %d rounds", spec.label, len(fns), rounds)
    t = interleaved(fns, rounds, warmup=1)
    tokens = BATCH * NEW
    tps = {k: tokens / v.median for k, v in t.items()}
    rows = [Row(f"tokens/s, batch {BATCH}, {label}", tps[f"ours {key}"], tps[f"PEFT {key}"],
                "count") for key, label in (("one", "all on one adapter"),
                                            ("mixed", f"{N_ADAPTERS} different adapters"),
                                            ("none", "no adapter"))]
    rows.append(Row("mixed / one adapter", tps["ours mixed"] / tps["ours one"],
                    tps["PEFT mixed"] / tps["PEFT one"], "ratio"))
    # the checks pair the two contenders of each ratio within a round (a slow spell of this
    # shared machine then lands on both) and take the median of the rounds' ratios
    mixed_vs_one = _paired(t["ours one"], t["ours mixed"])
    mixed_vs_peft = _paired(t["PEFT mixed"], t["ours mixed"])
    rows.append(Row("per round: ours mixed / ours one (median)", mixed_vs_one, None, "ratio"))
    rows.append(Row("per round: ours mixed / PEFT mixed (median)", mixed_vs_peft, None,
                    "ratio"))
    rows.append(Row("per round: ours with no adapter / PEFT mixed (median; the ceiling)",
                    _paired(t["PEFT mixed"], t["ours none"]), None, "ratio"))
    table = Table(
        f"Serving throughput, {N_ADAPTERS} adapters {spec.label}",
        rows,
        [f"{BATCH} requests of {PROMPT} prompt tokens, {NEW} greedy new tokens each, submitted "
         f"together; medians of {rounds} interleaved rounds; tokens/s = generated tokens / "
         "wall time of the whole batch (prefill included). Ours: the engine (continuous "
         "batching, per-row slots; a one-adapter batch runs merged; no CPU tuning, "
         "whose pieces the CPU tuning ablation times). PEFT: "
         "`generate(adapter_names=...)` for the mixed batch, `set_adapter` for one, "
         "`disable_adapter` for none. The 'per round' rows (and the checks) divide the "
         "two throughputs measured in the same round and take the median over rounds; a "
         "mixed batch that ran at the bare model's speed would reach the ceiling row."],
    )
    checks = [
        Check(f"{spec.label}: mixed-adapter throughput >= 0.85x one adapter's",
              f"{mixed_vs_one:.2f}", mixed_vs_one >= 0.85),
        Check(f"{spec.label}: mixed-adapter throughput >= 1.3x PEFT's mixed batch",
              f"{mixed_vs_peft:.2f}", mixed_vs_peft >= 1.3),
    ]
    bound = _decode_bound(engine, prompts, names, max(3, repeats // 2))
    engine.table.cache.close()
    return [table, bound], checks


def _paired(slow: Timing, fast: Timing) -> float:
    """Median over rounds of one round's time of ``slow`` / its time of ``fast`` (the
    throughput of ``fast`` relative to ``slow``)."""
    return statistics.median(a / b for a, b in zip(slow.samples, fast.samples, strict=True))


def _decode_bound(engine: Engine, prompts: list[list[int]], names: list[str],
                  rounds: int) -> Table:
    """One decode step, timed alone: all on one adapter (merged), 8 different adapters, and
    the mixed step's LoRA matmuls by themselves. one / (one + LoRA alone) is the most a
    mixed batch can reach against one adapter with these matmuls, whatever the engine."""
    def step_times(adapters: list[str]) -> list[float]:
        # the first step prefills (and merges or unmerges); the last also retires the batch
        return generate_batch(engine, prompts, adapters)[1:-1]

    step_times(names)  # puts the 8 adapters in slots
    layers = list(surgery.lora_layers(engine.model).values())
    slots = tuple(sorted({engine.table.slot_of(n) for n in names}))
    layout = slot_ops.grouped_layout(slots, slots)  # a token per slot, sorted: a view
    g = torch.Generator().manual_seed(3)
    work = []
    for layer in layers:
        a = [p.detach() for p in layer.lora_a]
        b = [p.detach() for p in layer.lora_b]
        sa, sb = slot_ops.stack_factors(a, b, [sp.scale for sp in layer.specs], slots)
        x = torch.randn(BATCH, layer.in_features, generator=g)
        work.append((x, sa, sb, torch.zeros(BATCH, layer.out_features)))

    def lora_alone() -> None:
        with torch.inference_mode():
            for x, sa, sb, y in work:
                slot_ops.grouped_add(y, x, sa, sb, layout)

    one, mixed, alone = [], [], []
    for _ in range(max(3, rounds)):
        one += step_times([names[0]] * BATCH)
        mixed += step_times(names)
        t0 = time.perf_counter()
        lora_alone()
        alone.append(time.perf_counter() - t0)
    one_ms, mixed_ms, alone_ms = (statistics.median(v) for v in (one, mixed, alone))
    return Table(
        f"One decode step, batch {BATCH}, {N_ADAPTERS} adapters: where the time goes",
        [Row("decode step, 8 different adapters vs all on one (merged)", mixed_ms, one_ms,
             "ms"),
         Row(f"the mixed step's LoRA matmuls alone ({len(layers)} layers) vs the one-adapter "
             "step", alone_ms, one_ms, "ms")],
        [f"Medians over the decode steps of {max(3, rounds)} rounds. 'LoRA matmuls alone': "
         "the batched matmul pair per layer that adds each row's own adapter (8 adapters, a "
         "row each), on random inputs, nothing else. A mixed step costs at least one step "
         "plus that, so mixed / one "
         f"throughput cannot pass {one_ms / (one_ms + alone_ms):.2f} with these matmuls "
         f"(measured: {one_ms / mixed_ms:.2f})."],
        peer_name="one adapter")


def _switching(base, store, repeats):
    names = [f"a{i}" for i in range(N_ADAPTERS)]
    model = copy.deepcopy(base)
    cache = AdapterCache(store, 2**30)
    table = SlotTable(model, cache, n_slots=2, max_rank=16)
    for n in names:
        cache.get(n)  # all in RAM; only 2 slots, so activating refills a slot
    theirs = _peft(base, store, names)
    # each contender walks its own sequence of adapters (a shared counter would hand one
    # side only even turns and the other only odd ones)
    turns = {k: itertools.count() for k in ("act", "set", "load", "sw", "sw_peft")}

    def activate() -> None:
        table.activate(names[next(turns["act"]) % len(names)])

    def peft_set() -> None:
        theirs.set_adapter(names[next(turns["set"]) % len(names)])

    def load_ours() -> None:
        name = names[next(turns["load"]) % len(names)]
        if table.slot_of(name) is None and name in cache:
            cache.evict(name)
        table.activate(name)

    extra = itertools.count()

    def load_peft() -> None:
        name = f"x{next(extra)}"
        theirs.load_adapter(store.path_of(names[0]), adapter_name=name)
        theirs.delete_adapter(name)

    def switch_ours() -> None:
        table.merge(names[next(turns["sw"]) % 2])

    def switch_peft() -> None:
        theirs.unmerge_adapter()
        theirs.set_adapter(names[next(turns["sw_peft"]) % 2])
        theirs.merge_adapter()

    reps = max(repeats * 3, 10)
    log.info("serve switching: %d rounds", reps)
    act = interleaved({"ours": activate, "PEFT": peft_set}, reps, warmup=2, rotate=False)
    load = interleaved({"ours": load_ours, "PEFT": load_peft}, reps, warmup=2, rotate=False)
    theirs.set_adapter(names[0])
    theirs.merge_adapter()
    sw = interleaved({"ours": switch_ours, "PEFT": switch_peft}, reps, warmup=2, rotate=False)
    med = {k: {n: v.median for n, v in d.items()} for k, d in
           (("act", act), ("load", load), ("sw", sw))}
    rows = [
        Row("activate an adapter already in RAM", med["act"]["ours"], med["act"]["PEFT"], "ms"),
        Row("load an adapter from disk", med["load"]["ours"], med["load"]["PEFT"], "ms"),
        Row("switch the merged adapter", med["sw"]["ours"], med["sw"]["PEFT"], "ms"),
    ]
    table_ = Table(
        f"Adapter activation and switching ({QV_R8.label})", rows,
        ["Ours: slot table over the cache with 2 slots and 8 cached adapters (activation "
         "refills a slot); load = cache miss (evicted first) + activation, i.e. read, check "
         "and install; switch = W += dW_new - dW_old. PEFT: `set_adapter`; `load_adapter` "
         "(then `delete_adapter`); `unmerge_adapter` + `set_adapter` + `merge_adapter`."])
    checks = [
        Check("activate an adapter in RAM < 1 ms", f"{1e3 * med['act']['ours']:.3f} ms",
              med["act"]["ours"] < 1e-3),
        Check("load an r=8 q,v adapter from disk < 50 ms",
              f"{1e3 * med['load']['ours']:.1f} ms", med["load"]["ours"] < 0.05),
        Check("merged switch <= 0.5x PEFT's unmerge + merge",
              f"{med['sw']['ours'] / med['sw']['PEFT']:.2f}",
              med["sw"]["ours"] <= 0.5 * med["sw"]["PEFT"]),
    ]
    return table_, checks


LOAD = 0.75
"""Arrival rate as a share of the engine's measured capacity (a fixed rate would put a
faster engine, or a faster day of this shared machine, at a lighter load)."""


ARRIVAL_WORKLOADS = (((8, 24), 160), ((8, 64), 80))
"""(new tokens per request, low and high; requests): a narrow spread of answer lengths,
where a static batch wastes little (it waits for its longest: ~21 of a mean 16 tokens, and
on this CPU a thinned batch's steps are cheaper), and a wider one, nearer to chat, where
it waits for ~55 of a mean 36 (fewer requests, so a run takes about as long)."""


Plan = list[tuple[float, str, int]]
"""(seconds after the previous request, adapter, new tokens) per request."""


def arrival_plan(base, tokenizer, store: AdapterStore, n_adapters: int, n_requests: int,
                 new: tuple[int, int]) -> tuple[Plan, list[list[int]], float]:
    """The arrival workload: its plan, its prompts, and its rate (``LOAD`` of the untuned
    static engine's measured capacity, in requests per second)."""
    rng = random.Random(3)
    shape = [(rng.expovariate(1.0), f"a{rng.randrange(n_adapters)}", rng.randint(*new))
             for _ in range(n_requests)]
    prompts = [random_ids(base, 1, PROMPT, seed=200 + i)[0].tolist() for i in range(n_requests)]
    capacity = _capacity(base, tokenizer, store, shape, prompts)
    rate_per_s = LOAD * capacity
    log.info("arrivals: capacity %.2f requests/s, rate %.2f/s", capacity, rate_per_s)
    return [(gap / rate_per_s, name, n) for gap, name, n in shape], prompts, rate_per_s


def _arrivals(base, tokenizer, root, n_adapters=20, n_requests=160, new=(8, 24)):
    if not (root / "a0").exists():  # the workloads share one store
        make_store(base, QV_R8, root, n_adapters)
    store = AdapterStore(root)
    plan, prompts, rate_per_s = arrival_plan(base, tokenizer, store, n_adapters, n_requests,
                                             new)
    capacity = rate_per_s / LOAD
    runs: dict[Batching, list[dict]] = {Batching.CONTINUOUS: [], Batching.STATIC: []}
    for mode in (Batching.CONTINUOUS, Batching.STATIC, Batching.STATIC,
                 Batching.CONTINUOUS):  # sandwiched
        runs[mode].append(arrival_run(base, tokenizer, store, plan, prompts, mode))
        log.info("arrivals %s: p99 %.2f s", mode, _percentile(runs[mode][-1]["latencies"], 0.99))
    results = {}
    for mode, done in runs.items():
        lat = sorted(x for r in done for x in r["latencies"])  # both runs' requests pooled
        results[mode] = {"tps": sum(r["tokens"] for r in done) / sum(r["wall"] for r in done),
                         "p50": statistics.median(lat), "p99": _percentile(lat, 0.99),
                         "evictions": statistics.median(r["evictions"] for r in done)}
    c, s = results[Batching.CONTINUOUS], results[Batching.STATIC]
    rows = [Row("throughput, tokens/s", c["tps"], s["tps"], "count"),
            Row("latency p50", c["p50"], s["p50"], "ms"),
            Row("latency p99", c["p99"], s["p99"], "ms"),
            Row("cache evictions per run", c["evictions"], s["evictions"], "count")]
    table = Table(
        f"Arrivals: {n_requests} requests for {n_adapters} adapters, RAM for 4, "
        f"{new[0]}-{new[1]} new tokens", rows,
        [f"Requests arrive as a Poisson process at {LOAD:.2f} of the engine's capacity "
         f"({rate_per_s:.2f}/s; capacity {capacity:.2f} requests/s, measured first: the "
         "first 16 requests queued at once on static batches, the faster of 2 runs), "
         f"each for a random one of {n_adapters} q,v r=8 adapters, "
         f"{PROMPT}-token prompt, {new[0]}-{new[1]} new tokens; cache budget 4 adapters, "
         "4 slots, batch <= 4. Continuous: requests join between decode steps, their "
         "prompts prefilled inside the next decode step as one packed sequence "
         "(serve.packed). Static: a batch runs to its end before the next is formed. "
         "Latency = submit to last token. "
         "Each mode runs twice (continuous, static, static, continuous) and the two runs' "
         "latencies are pooled, so p99 is not one request's."],
        peer_name="static")
    return table, [Check(f"arrivals, {new[0]}-{new[1]} new tokens: continuous batching p99 "
                         "latency < static's",
                         f"{c['p99']:.1f} s vs {s['p99']:.1f} s", c["p99"] < s["p99"])]


def _capacity(base, tokenizer, store, plan, prompts, n: int = 16) -> float:
    """Requests per second the static engine serves with the plan's first ``n`` requests
    all queued at once, untuned; the faster of two runs (the first pays one-time costs: page
    faults)."""
    queued = [(0.0, name, k) for _, name, k in plan[:n]]
    return max(n / arrival_run(base, tokenizer, store, queued, prompts[:n], Batching.STATIC)["wall"]
               for _ in range(2))


def arrival_run(base, tokenizer, store, plan, prompts, mode: Batching,
                cpu_tuning: CpuTuning | None = None) -> dict:
    """One arrival run of the engine in ``mode``: requests fed on the plan's schedule."""
    model = copy.deepcopy(base)
    cache = AdapterCache(store, 4 * store.info("a0").size + 1024)
    table = SlotTable(model, cache, n_slots=4, max_rank=16)
    make = Engine.static_baseline if mode is Batching.STATIC else Engine
    engine = make(model, tokenizer, table, max_batch=4, cpu_tuning=cpu_tuning).start()
    handles = []
    started = time.perf_counter()

    def feed() -> None:
        for (gap, name, n), p in zip(plan, prompts, strict=True):
            time.sleep(gap)
            handles.append(engine.submit(Request(p, adapter=name, max_new_tokens=n)))

    feeder = threading.Thread(target=feed)
    feeder.start()
    feeder.join()
    latencies = [h.result(timeout=3600).total_s for h in handles]
    wall = time.perf_counter() - started
    engine.close()
    return {"latencies": latencies, "wall": wall, "evictions": cache.stats.evictions,
            "tokens": sum(len(h.result().tokens) for h in handles)}


def _percentile(values: list[float], q: float) -> float:
    lat = sorted(values)
    return lat[min(len(lat) - 1, int(q * len(lat)))]


def _routing(base, tokenizer):
    from loratree.demo.tasks import TASKS, write_tasks
    from loratree.models.chat import encode_prompt, prompt_messages
    from loratree.train.data import read_jsonl

    with tempfile.TemporaryDirectory(prefix="loratree-route-") as tmp:
        data = write_tasks(Path(tmp) / "data", 200, 50, names=tuple(TASKS))
        store = AdapterStore(Path(tmp) / "store")
        model = copy.deepcopy(base)
        dummy = add_ours_slot(model, QV_R8, seed=1)
        held = []
        for task, (train_path, eval_path) in data.items():
            info = store.save(task, model, dummy)
            rows = read_jsonl(train_path).rows
            feats = prompt_features(model, [encode_prompt(prompt_messages(r), tokenizer)
                                            for r in rows])
            write_centroid(info.path, feats)
            held += [(task, encode_prompt(prompt_messages(r), tokenizer))
                     for r in read_jsonl(eval_path).rows]
        surgery.unload(model)
        router = Router(store, model)
        per_task = {}
        for task, prompt in held:
            per_task.setdefault(task, []).append(router.route(prompt).adapter == task)
    acc = {t: sum(v) / len(v) for t, v in per_task.items()}
    overall = sum(sum(v) for v in per_task.values()) / len(held)
    rows = [Row(f"routing accuracy, {t}", a, None, "share") for t, a in acc.items()]
    rows.append(Row("routing accuracy, all held-out prompts", overall, None, "share"))
    return Table("Routing between fine-tunes (adapter=\"auto\")", rows,
                 ["Centroids from 200 training prompts per demo task (SmolLM2's mean-pooled "
                  "last hidden state, no adapter), held-out prompts routed by centred cosine "
                  "similarity; no extra model."]), []

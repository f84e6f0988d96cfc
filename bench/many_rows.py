"""Fused multi-job training vs the alternatives: 4 LoRA jobs (r=8 all-linear, batch 4 x up
to 128 tokens per job per step) on the demo tasks. Each variant runs in a fresh process
(``bench.many_worker``), so its peak RSS is its own."""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.many_worker import BATCH, JOBS, RANK, STEPS, job_configs
from bench.report import Check, Row, Table
from loratree.demo.tasks import write_tasks

__all__ = ["many_tables"]

log = logging.getLogger(__name__)
EM_GAP = 0.02
"""Acceptance: each fused job's held-out exact match within 2 points of its solo run."""


def _worker(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.many_worker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.many_worker failed: {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _timed(*args: str) -> dict:
    """One worker process, run to its end; its result with ``process``: the seconds from
    its launch to its exit (start, imports, model load, the run, saving)."""
    t0 = time.perf_counter()
    result = _result(_worker(*args))
    result["process"] = time.perf_counter() - t0
    return result


def _one_after_another(data: Path, out: Path) -> dict:
    """The 4 jobs as 4 ``solo`` processes one after another (``loratree train`` 4 times):
    times summed, qualities merged, the peak RSS the largest."""
    parts = [_timed("solo", str(data), str(out), str(i)) for i in range(len(JOBS))]
    return {"process": sum(p["process"] for p in parts), "wall": sum(p["wall"] for p in parts),
            "eval": sum(p["eval"] for p in parts), "save": sum(p["save"] for p in parts),
            "quality": {k: v for p in parts for k, v in p["quality"].items()},
            "peak_rss": max(p["peak_rss"] for p in parts)}


def many_tables(root: Path) -> tuple[list[Table], list[Check]]:
    data = root / "data"
    write_tasks(data, 400, 50, names=tuple(sorted({t for t, _ in JOBS})))
    kept: dict[str, list[dict]] = {"fused": [], "sequential": []}
    peft = {}
    # fused and one-after-another twice, sandwiched, so a slow spell of this shared
    # machine does not land on one side only; each job runs in a fresh process
    for i, mode in enumerate(("fused", "sequential", "peft", "sequential", "fused")):
        log.info("fused training bench: %s", mode)
        where = root / f"{mode}{i}"
        if mode == "fused":
            kept[mode].append(_timed("fused", str(data), str(where)))
        elif mode == "sequential":
            kept[mode].append(_one_after_another(data, where))
        else:
            peft = _result(_worker("peft", str(data), str(where)))
    runs = {}
    for mode, results in kept.items():
        runs[mode] = {
            "quality": results[0]["quality"], "peak_rss": results[0]["peak_rss"],
            **{k: statistics.median(r[k] for r in results)
               for k in ("process", "wall", "eval", "save")},
            "train": statistics.median(r["wall"] - r["eval"] - r["save"] for r in results)}
    log.info("fused training bench: steps interleaved in one process")
    inproc = _result(_worker("inprocess", str(data), str(root / "inprocess")))
    log.info("fused training bench: 4 processes at once")
    t0 = time.perf_counter()
    procs = [_worker("solo", str(data), str(root / "procs"), str(i)) for i in range(len(JOBS))]
    separate = [_result(p) for p in procs]
    at_once = time.perf_counter() - t0  # they run side by side: launch of all to the last exit
    fused, seq = runs["fused"], runs["sequential"]
    procs_peak = sum(r["peak_rss"] for r in separate)
    rows = [
        Row("end to end, 4 jobs one after another (4 single-job processes, as `loratree "
            "train` runs them: each starts, loads the base, trains, evaluates, saves)",
            fused["process"], seq["process"], "ms"),
        Row("in the trainer (training, held-out evaluation, saving; start and base load "
            "excluded)", fused["wall"], seq["wall"], "ms"),
        Row("of which training steps", fused["train"], seq["train"], "ms"),
        Row("of which held-out evaluation", fused["eval"], seq["eval"], "ms"),
        Row("of which saving (adapter files and routing centroid)", fused["save"],
            seq["save"], "ms"),
        Row("training steps, 4 PEFT runs one after another", fused["train"], peft["wall"],
            "ms"),
        Row("end to end, 4 separate processes at once", fused["process"], at_once, "ms"),
        Row("peak RSS, fused vs sum of 4 separate processes", fused["peak_rss"], procs_peak,
            "bytes"),
        Row("one fused step vs the 4 jobs' solo steps, interleaved in one process",
            inproc["fused_step"], inproc["solo_steps"], "ms"),
        Row("bound: forward + backward over 16 rows vs 4 passes of 4 rows (one slot)",
            inproc["one_pass16"], inproc["four_pass4"], "ms"),
    ]
    names, _ = job_configs(data, root)
    timing = Table(
        "Training 4 adapters at once: fused vs one after another vs separate processes",
        rows,
        [f"4 jobs ({', '.join(names)}), LoRA r={RANK} all-linear, {STEPS} steps of batch "
         f"{BATCH} (up to 128 tokens) each, AdamW; 'ours' is always the fused run (one "
         "process, one forward and backward over the 4 jobs' rows per step), the other "
         "column the alternative named in the row. Each job runs as configured: 30 steps, "
         "then its held-out evaluation (eval loss on 50 rows, exact match of greedy answers "
         "on 30) at the last step, then its adapter is saved. One after another, each job "
         "is its own process, as `loratree train` runs it; 'end to end' times each process "
         "from launch to exit (Python start and imports, base load, data, training, "
         "evaluation, saving: what a user waits), 'in the trainer' the training, "
         "evaluation and saving alone (saving computes each adapter's routing centroid "
         "over its first 256 training prompts; fused jobs on the same prompts share one "
         "feature pass). Fused, the 4 jobs are due together and their generations share "
         "batches (16 rows of each job per batch, each row through its job's slot, a row "
         "leaving its batch when it stops); alone, each job generates in batches of 16. "
         "PEFT's runs are training steps only (PEFT has no evaluation loop), in one "
         "process. The separate processes at once run side by side on this machine's 2 "
         "cores, timed from the launch of all to the last exit. Peak RSS is each process's "
         "VmHWM. Fused and one-after-another times are medians of 2 runs each (fused, "
         "one after another, PEFT, one after another, fused). The last two rows time single "
         "steps in one process, alternating, medians of 7 rounds; the bound row runs 16 "
         "random rows of 56 tokens through one all-linear r=8 slot in one pass or in 4: "
         "what a fused pass over every job's rows could gain on this CPU at most."],
        peer_name="alternative")
    qrows = []
    gaps = {}
    for name in names:
        f, s = fused["quality"].get(name, {}), seq["quality"].get(name, {})
        qrows.append(Row(f"{name}: held-out exact match", f.get("exact_match", 0.0),
                         s.get("exact_match", 0.0), "share"))
        qrows.append(Row(f"{name}: eval loss", f.get("eval_loss", float("nan")),
                         s.get("eval_loss", float("nan")), "ratio"))
        gaps[name] = abs(f.get("exact_match", 0.0) - s.get("exact_match", 0.0))
    quality = Table("Fused jobs' quality next to the same jobs trained alone", qrows,
                    ["30 held-out examples per job, greedy; 'alternative' = the job trained "
                     "alone by `train` with the same seed, data order and steps."],
                    peer_name="alone")
    checks = [
        Check("fused 4 jobs <= 0.9x the time of running them one after another (end to "
              "end: one fused process vs 4 single-job processes, as `loratree train` runs them)",
              f"{fused['process'] / seq['process']:.2f} (in the trainer, start and base "
              f"load excluded: {fused['wall'] / seq['wall']:.2f}; training steps "
              f"{fused['train'] / seq['train']:.2f})",
              fused["process"] <= 0.9 * seq["process"]),
        Check("fused peak RSS <= 0.4x the sum over 4 separate processes",
              f"{fused['peak_rss'] / procs_peak:.2f}", fused["peak_rss"] <= 0.4 * procs_peak),
        Check("each fused job's held-out EM within 2 points of its solo run",
              f"max gap {100 * max(gaps.values()):.1f} points",
              max(gaps.values()) <= EM_GAP + 1e-9),
    ]
    return [timing, quality], checks

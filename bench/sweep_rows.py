"""The rank plane measured on SmolLM2: ``loratree sweep`` on one demo task (q,v / attention /
all-linear x r = 1, 2, 4, 8, plus full fine-tuning, one step budget), and a ``--grow`` run
(all-linear from r=1, doubling when the eval loss stalls) against the sweep's best point.

The sweep's table and plot go into the report; the plot is copied to ``bench/sweep.png``
(linked from BENCHMARKS.md). The grow rows need ``TrainConfig.grow``; where the build has no
such field they are left out with a note, and the group still runs.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

from bench.report import Check, Row, Table
from loratree.demo.tasks import write_tasks
from loratree.fsio import atomic_write
from loratree.models import load_base
from loratree.sweep import (
    SweepConfig,
    SweepResult,
    parse_target_sets,
    point_config,
    run_sweep,
)
from loratree.sweep.report import markdown_table, recommendation_line
from loratree.train import TrainConfig, train
from loratree.train.data import read_jsonl
from loratree.train.evaluate import exact_match

__all__ = ["sweep_tables"]

log = logging.getLogger(__name__)

TASK = "pirate"
"""The demo task whose plane varies most (bench quality table: 0% to 100% across it)."""
SETS = "q,v;attention;all-linear"
RANKS = (1, 2, 4, 8)
STEPS, BATCH, LR, FULL_LR = 30, 4, 1e-3, 5e-5
N_TRAIN, N_EVAL, MAX_NEW = 400, 30, 24
GROW_BUDGET = 2
"""The grow run's budget: one run of twice one sweep point's steps (it starts at r=1)."""
GROW_EVERY, GROW_TOLERANCE = 5, 0.02
"""Eval-loss checks every 5 steps; a drop under 0.02 nats is a stall."""
GROW_GAP = 2.0
"""Acceptance: the grow run's exact match within this many points of the best fixed rank."""
PLOT = Path(__file__).with_name("sweep.png")


def sweep_tables(root: Path, steps: int = STEPS, plot: Path = PLOT
                 ) -> tuple[list[Table], list[Check]]:
    """Run the sweep (and the grow run) under ``root``; the tables and checks."""
    train_path, eval_path = write_tasks(root / "data", N_TRAIN, N_EVAL, names=(TASK,))[TASK]
    config = SweepConfig(
        data=str(train_path), eval_data=str(eval_path), out=str(root / "sweep"),
        target_sets=parse_target_sets(SETS), ranks=RANKS, steps=steps, batch_size=BATCH,
        lr=LR, full_lr=FULL_LR, max_length=96, eval_examples=N_EVAL, max_new_tokens=MAX_NEW)
    base, tokenizer = load_base(None)
    log.info("sweep bench: %d configurations x %d steps", len(RANKS) * 3 + 1, steps)
    result = run_sweep(config, model=base, tokenizer=tokenizer, progress=False)
    atomic_write(plot, lambda tmp: shutil.copyfile(Path(config.out) / "sweep.png", tmp))
    tables, checks = _sweep_table(result, plot)
    if {"grow", "grow_max_rank"} <= {f.name for f in dataclasses.fields(TrainConfig)}:
        grow_table, grow_checks = _grow_table(config, result, base, tokenizer, root)
        tables.append(grow_table)
        checks += grow_checks
    else:
        tables.append(Table("Rank growth (--grow) against the sweep", [],
                            ["Not measured: this build's TrainConfig has no grow field."],
                            peer_name="sweep"))
    return tables, checks


def _sweep_table(result: SweepResult, plot: Path) -> tuple[list[Table], list[Check]]:
    c, rows = result.config, result.rows
    full = next((r for r in rows if r.full), None)
    lora = [r for r in rows if not r.full and r.exact_match is not None]
    best = max(lora, key=lambda r: (r.exact_match, -r.trainable_params))
    rec = result.recommended

    def peer(attr: str) -> float | None:
        return getattr(full, attr) if full is not None else None

    summary = [
        Row(f"best LoRA point ({best.name}): held-out exact match", best.exact_match,
            peer("exact_match"), "share"),
        Row(f"recommended ({rec.name}): held-out exact match", rec.exact_match,
            peer("exact_match"), "share"),
        Row(f"recommended ({rec.name}): trainable parameters", rec.trainable_params,
            peer("trainable_params"), "count"),
        Row(f"recommended ({rec.name}): adapter bytes", rec.adapter_bytes,
            peer("adapter_bytes"), "bytes"),
        Row(f"recommended ({rec.name}): solo step time", rec.step_seconds,
            peer("step_seconds"), "ms"),
        Row(f"wall time: fused LoRA pass ({len(lora)} points) / full fine-tuning",
            result.seconds["lora"], result.seconds.get("full"), "ms"),
    ]
    png = plot.relative_to(plot.parent.parent) if plot.parent.name == "bench" else plot
    notes = [
        f"`loratree sweep` on the {TASK} demo task ({N_TRAIN} training rows), SmolLM2 fp32: "
        f"target sets q,v / attention / all-linear x r = {', '.join(map(str, RANKS))} in one "
        f"fused pass, plus full fine-tuning; {c.steps} steps of batch {c.batch_size} each, "
        f"LoRA lr {c.lr:g}, alpha = 2 r, full fine-tuning lr {c.full_lr:g}; exact match of "
        f"greedy answers on {N_EVAL} held-out rows. Step time: median of "
        f"{c.timing_steps} solo optimizer steps after a warm-up, each configuration alone "
        f"on the base. Recommendation: fewest trainable parameters within {c.tolerance:g} "
        f"points of the best exact match. Whole sweep {result.seconds['total']:.0f} s "
        f"(full fine-tuning {result.seconds.get('full', 0):.0f} s, fused LoRA pass "
        f"{result.seconds['lora']:.0f} s, step timing {result.seconds['timing']:.0f} s).",
        "", markdown_table(result).rstrip("\n"), "", recommendation_line(result), "",
        f"![held-out exact match against trainable parameters]({png})",
    ]
    table = Table(f"Rank sweep on the {TASK} task: the plane, measured", summary, notes,
                  peer_name="full fine-tuning")
    scored = sum(r.exact_match is not None for r in rows)
    check = Check("sweep: 3 target sets x 4 ranks + full fine-tuning trained and scored; "
                  "table and plot written", f"{scored} of {len(rows)} rows scored",
                  scored == len(rows) == 3 * len(RANKS) + 1 and plot.is_file())
    return [table], [check]


def _grow_table(config: SweepConfig, result: SweepResult, base, tokenizer, root: Path
                ) -> tuple[Table, list[Check]]:
    """One ``grow`` run on all-linear from r=1 (up to the sweep's largest rank), scored on
    the same held-out rows, against the sweep's best fixed-rank point and its wall time."""
    c = dataclasses.replace(point_config(config, root / "grow", rank=1,
                                         targets=("all-linear",)),
                            max_steps=GROW_BUDGET * config.steps, eval_every=GROW_EVERY,
                            warmup_steps=max(1, GROW_BUDGET * config.steps // 10),
                            eval_examples=0)
    c = TrainConfig(**{**c.to_dict(), "grow": True, "grow_max_rank": max(RANKS),
                       "grow_patience": 1, "grow_tolerance": GROW_TOLERANCE})
    started = time.perf_counter()
    out = train(c, progress=False, model=base, tokenizer=tokenizer)
    rows = read_jsonl(config.eval_data).rows[:N_EVAL]
    em, _ = exact_match(base, tokenizer, rows, max_new_tokens=MAX_NEW)
    wall = time.perf_counter() - started
    ranks = tuple(getattr(out, "ranks", ()) or (1,))
    lora = [r for r in result.rows if not r.full and r.exact_match is not None]
    best = max(lora, key=lambda r: (r.exact_match, -r.trainable_params))
    sweep_wall = result.seconds["total"]
    rows_out = [
        Row(f"final rank (grew {' -> '.join(map(str, ranks))}) vs the best point's "
            f"({best.name})", ranks[-1], best.rank, "count"),
        Row("held-out exact match", em, best.exact_match, "share"),
        Row("wall time (grow: training + evaluation; sweep: all of it)", wall, sweep_wall,
            "ms"),
    ]
    note = (f"One `train --grow` run: all-linear from r=1, rank doubled after an eval-loss "
            f"check (every {GROW_EVERY} steps) that improves by less than {GROW_TOLERANCE} "
            f"nats, at most r={max(RANKS)}; {c.max_steps} steps of batch {c.batch_size}, lr "
            f"{c.lr:g} (constant after warmup)"
            f"{', stopped early' if getattr(out, 'stopped_early', False) else ''}. "
            f"'sweep' = the sweep's best fixed-rank LoRA point, and the whole sweep's time.")
    gap = 100 * abs(em - best.exact_match)
    checks = [
        Check(f"grow run's held-out EM within {GROW_GAP:g} points of the best fixed rank",
              f"{gap:.1f} points", gap <= GROW_GAP + 1e-9),
        Check("grow run's wall time < the whole sweep's", f"{wall:.0f} s vs {sweep_wall:.0f} s",
              wall < sweep_wall),
    ]
    return Table("Rank growth (--grow) against the sweep", rows_out, [note],
                 peer_name="sweep"), checks

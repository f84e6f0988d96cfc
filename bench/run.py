"""``python -m bench.run --out BENCHMARKS.md [--quick]``: measure every row, write markdown.

Reads top-down: set up threads and the model, run each group, render, write atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

from bench.api_rows import FULL as API_FULL
from bench.api_rows import QUICK as API_QUICK
from bench.api_rows import api_tables
from bench.contenders import QV_R8, load_model, random_ids
from bench.cpu_ablation import DEFAULT as CPU_DEFAULT
from bench.cpu_ablation import QUICK as CPU_QUICK
from bench.cpu_ablation import AblationSettings, ablation_tables
from bench.dora_rows import dora_tables
from bench.embedding_split import split_table
from bench.harness import configure_threads, machine_info
from bench.lora_rows import file_tables, forward_tables, merge_tables
from bench.prefix_rows import prefix_tables
from bench.qlora_rows import qlora_tables
from bench.quality import qlora_gaps, quality_markdown, quality_rows
from bench.report import Check, Table, render, splice, write_atomic
from bench.serve_rows import make_store, serve_tables
from bench.train_rows import train_tables
from loratree.models import load_base

__all__ = ["main", "run"]

log = logging.getLogger("bench")

BATCH, SEQ = 8, 128
FULL = {"forward": 20, "ops": 30, "train": 9}
QUICK = {"forward": 2, "ops": 3, "train": 2}
QUALITY_TARGET = 0.90
"""Acceptance: LoRA r=8 all-linear reaches 90% of full fine-tuning's held-out exact match."""
GROUPS = ("forward", "merge", "files", "train", "qlora", "prefix", "dora", "serve", "api",
          "split", "cpu", "many", "sweep", "tree", "ray", "quality")
QLORA_GAP = 5.0
"""Acceptance: QLoRA's held-out exact match is within this many points of LoRA's."""


def run(quick: bool, quality_steps: int = 30, groups: tuple[str, ...] = GROUPS,
        cpu: AblationSettings = CPU_DEFAULT) -> str:
    """Run the benchmark groups named (all by default) and return the markdown report;
    ``cpu`` sizes the CPU tuning ablation (``--quick`` takes its smallest settings)."""
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    threads = configure_threads()
    repeats = QUICK if quick else FULL
    log.info("torch threads: %d; repeats: %s", threads, repeats)
    base = load_model()
    for p in base.parameters():
        p.requires_grad_(False)
    ids = random_ids(base, BATCH, SEQ)
    log.info("model loaded in %.1f s", time.perf_counter() - t0)

    tables: list[Table] = []
    checks: list[Check] = []

    def want(group: str) -> bool:
        return group in groups

    if want("forward"):
        forward, forward_checks = forward_tables(base, ids, repeats["forward"])
        tables += forward
        checks += forward_checks
    if want("merge"):
        tables += merge_tables(base, repeats["ops"])
    if want("files"):
        with tempfile.TemporaryDirectory(prefix="loratree-bench-") as tmp:
            tables += file_tables(base, Path(tmp))
    if want("train"):
        train, train_checks = train_tables(base, repeats["train"])
        tables += train
        checks += train_checks
    if want("qlora"):
        with tempfile.TemporaryDirectory(prefix="loratree-bench-") as tmp:
            qlora, qlora_checks = qlora_tables(base, repeats["train"], Path(tmp))
        tables += qlora
        checks += qlora_checks
    if want("prefix"):
        with tempfile.TemporaryDirectory(prefix="loratree-bench-") as tmp:
            prefix, prefix_checks = prefix_tables(base, repeats["train"], Path(tmp))
        tables += prefix
        checks += prefix_checks
    tokenizer = (load_base(None)[1] if {"serve", "api", "split", "cpu", "quality"} & set(groups)
                 else None)
    served, serve_checks = _serving_groups(base, tokenizer, groups, repeats,
                                           CPU_QUICK if quick else cpu, quick)
    tables += served
    checks += serve_checks
    rooted, rooted_checks = _rooted_groups(groups)
    tables += rooted
    checks += rooted_checks
    extra: list[str] = []
    if want("quality") and quality_steps > 0:
        extra, quality_checks = _quality(base, tokenizer, quality_steps, quick)
        checks += quality_checks

    elapsed = time.perf_counter() - t0
    load_end = os.getloadavg()[0]
    method = [
        "Model: SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576), float32, "
        "the embedded GGUF converted to float32; each side works on its own deep copy.",
        f"Input: batch {BATCH} x {SEQ} random token ids; full forward to logits under "
        "torch.inference_mode, no KV cache.",
        "Both sides carry identical LoRA weights (A random, B random with std 0.01, "
        "alpha = 2 r), copied from ours into PEFT's modules by name.",
        "Contenders are timed interleaved in one process, one call each per round, the "
        "start rotating each round (merge / unmerge: fixed order merge, merge, unmerge, "
        "unmerge); one warm-up round is discarded.",
        f"Repeats: {repeats['forward']} rounds per forward row, {repeats['ops']} per "
        "merge / switch row; every number is a median. Overhead = median(adapted) / "
        "median(base) - 1, the base timed in the same rounds; the 'paired' rows take "
        "instead the median over rounds of adapted / base within each round.",
        "A round during which other processes used more than a quarter of a core "
        "(from /proc/stat) is run again, at most repeats / 4 times per row.",
        f"1-minute load average at start / end: {load_start:.2f} / {load_end:.2f} "
        f"(above {threads} means other processes shared the cores).",
        f"Training rows: batch 4 x 128 tokens (loss on the second half), forward + loss + "
        f"backward + AdamW per step, {repeats['train']} interleaved rounds; memory counted "
        "as described under each table.",
        f"{'Quick smoke run: too few repeats to trust. ' if quick else ''}"
        f"Whole run took {elapsed:.0f} s.",
    ]
    log.info("done in %.0f s", elapsed)
    return render("loratree benchmarks", machine_info(), method, tables, checks, extra)


def _serving_groups(base: object, tokenizer: object, groups: tuple[str, ...],
                    repeats: dict[str, int], cpu: AblationSettings, quick: bool
                    ) -> tuple[list[Table], list[Check]]:
    """The decode-step groups over the loaded model: dora, serve, api, split, cpu."""
    tables: list[Table] = []
    checks: list[Check] = []
    if "dora" in groups:
        tables += dora_tables(base, repeats["ops"])[0]
    if "serve" in groups:
        served, serve_checks = serve_tables(base, tokenizer, repeats["train"])
        tables += served
        checks += serve_checks
    if "api" in groups:
        api, api_checks = api_tables(base, tokenizer, API_QUICK if quick else API_FULL)
        tables += api
        checks += api_checks
    if "split" in groups:  # the ablation of splitting a large embeddings request
        with tempfile.TemporaryDirectory(prefix="loratree-split-") as tmp:
            store = make_store(base, QV_R8, Path(tmp), 2)
            tables.append(split_table(base, tokenizer, store, *((1, 64) if quick else ())))
    if "cpu" in groups:
        tables += ablation_tables(base, tokenizer, cpu)
    return tables, checks


def _rooted_groups(groups: tuple[str, ...]) -> tuple[list[Table], list[Check]]:
    """The groups that write their data and runs under a temp root: many, sweep, tree,
    ray (Ray Serve replicas: needs the ``ray`` extra, which ``make bench`` installs)."""
    from bench.many_rows import many_tables
    from bench.ray_replicas import ray_tables
    from bench.sweep_rows import sweep_tables
    from bench.tree_rows import tree_tables

    tables: list[Table] = []
    checks: list[Check] = []
    for group, measure in (("many", many_tables), ("sweep", sweep_tables),
                           ("tree", tree_tables), ("ray", ray_tables)):
        if group in groups:
            with tempfile.TemporaryDirectory(prefix=f"loratree-{group}-") as tmp:
                group_tables, group_checks = measure(Path(tmp))
            tables += group_tables
            checks += group_checks
    return tables, checks


def _quality(base, tokenizer, steps: int, quick: bool) -> tuple[list[str], list[Check]]:
    q_rows = quality_rows(base, tokenizer, steps=steps, n_eval=10 if quick else 30)
    extra, ratios = quality_markdown(q_rows, steps)
    checks = [Check(f"{task}: LoRA r=8 all-linear EM >= {QUALITY_TARGET:.0%} of full "
                    "fine-tuning's", f"{ratio:.2f}", ratio >= QUALITY_TARGET)
              for task, ratio in ratios.items()]
    checks += [Check(f"{task}: QLoRA held-out EM within {QLORA_GAP:.0f} points of LoRA's "
                     "(r=8 all-linear)", f"{gap:+.1f} points", abs(gap) <= QLORA_GAP)
               for task, gap in qlora_gaps(q_rows).items()]
    return extra, checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke check")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated groups to run, of: {','.join(GROUPS)}")
    parser.add_argument("--update", action="store_true",
                        help="splice the groups run into the existing --out report (its other "
                             "tables and checks stay) instead of replacing it")
    parser.add_argument("--quality-steps", type=int, default=30,
                        help="training steps per quality-table run (0 skips the table)")
    parser.add_argument("--cpu-rounds", type=int, default=AblationSettings.rounds,
                        help="measured rounds of the cpu group (CPU tuning ablation)")
    parser.add_argument("--cpu-arrival-requests", type=int,
                        default=AblationSettings.arrival_requests,
                        help="requests per arrival replay of the cpu group")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    groups = tuple(g.strip() for g in args.only.split(",") if g.strip())
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        parser.error(f"unknown group(s) {', '.join(unknown)}; choose from {', '.join(GROUPS)}")
    cpu = AblationSettings(rounds=args.cpu_rounds, arrival_requests=args.cpu_arrival_requests)
    text = run(args.quick, args.quality_steps, groups, cpu)
    if args.update and args.out.exists():
        text = splice(args.out.read_text(encoding="utf-8"), text,
                      note=f"Groups {', '.join(groups)} rerun on "
                           f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC "
                           f"(`python -m bench.run --only {','.join(groups)} --update`).")
    path = write_atomic(args.out, text)
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``loratree sweep``: train the rank plane (target sets x ranks, plus full fine-tuning) on
your data with one step budget; print the table and the smallest good configuration."""

from __future__ import annotations

import argparse

from loratree.sweep import SweepConfig, parse_ranks, parse_target_sets, run_sweep
from loratree.sweep.grid import DEFAULT_RANKS, DEFAULT_TARGET_SETS
from loratree.sweep.report import markdown_table, recommendation_line

__all__ = ["add_parser", "run"]

_DEFAULTS = SweepConfig(data="-", eval_data="-")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train target sets x ranks (and full fine-tuning) with "
                                     "one step budget; table, plot and a recommendation")
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval", dest="eval_data", required=True,
                   help="held-out JSONL: eval loss and exact match are measured on it")
    p.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: the embedded SmolLM2)")
    p.add_argument("--targets", type=parse_target_sets,
                   default=";".join(n for n, _ in DEFAULT_TARGET_SETS),
                   help="target sets separated by ';', each a known name (q,v / attention / "
                        "mlp / all-linear) or a comma list of patterns (default: %(default)s)")
    p.add_argument("--ranks", type=parse_ranks, default=",".join(map(str, DEFAULT_RANKS)),
                   help="comma-separated ranks (default: %(default)s)")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=True,
                   help="also run full fine-tuning, the plane's far corner (default: yes)")
    p.add_argument("--out", default=_DEFAULTS.out, help="output directory (default: "
                                                        "%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, kind, what in (
        ("steps", int, "optimizer steps per configuration"),
        ("batch_size", int, "examples per step"),
        ("lr", float, "learning rate of the LoRA points"),
        ("full_lr", float, "learning rate of full fine-tuning"),
        ("alpha_per_rank", float, "alpha = this x rank"),
        ("tolerance", float, "points of exact match from the best that still count"),
        ("eval_examples", int, "held-out rows answered for exact match"),
        ("max_new_tokens", int, "longest answer generated"),
        ("max_length", int, "examples are cut to this many tokens"),
        ("seed", int, "seed of every run"),
        ("rows_per_pass", int, "most rows per fused forward pass, 0: one job's batch"),
        ("timing_steps", int, "solo steps timed per configuration"),
    ):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind,
                       default=getattr(_DEFAULTS, name),
                       help=f"{what} (default: %(default)s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = SweepConfig(
        data=args.data, eval_data=args.eval_data, out=args.out, model=args.model,
        target_sets=args.targets, ranks=args.ranks, full=args.full, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, full_lr=args.full_lr,
        alpha_per_rank=args.alpha_per_rank, max_length=args.max_length, seed=args.seed,
        eval_examples=args.eval_examples, max_new_tokens=args.max_new_tokens,
        tolerance=args.tolerance, rows_per_pass=args.rows_per_pass,
        timing_steps=args.timing_steps)
    result = run_sweep(config, progress=not args.no_progress)
    print()
    print(markdown_table(result))
    print(recommendation_line(result))
    print(f"sweep of {len(result.rows)} configurations in {result.seconds['total']:.0f} s; "
          f"wrote {config.out}/sweep.md, sweep.csv, sweep.json and the plot "
          f"{config.out}/sweep.png")
    return 1 if any(r.error for r in result.rows) else 0

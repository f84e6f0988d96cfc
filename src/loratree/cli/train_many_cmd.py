"""``loratree train-many jobs.toml``: several LoRA jobs fused on one base in one process."""

from __future__ import annotations

import argparse

from loratree.train.many import ManyConfig, summary, train_many

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-many", help="train several LoRA adapters at once, each on its "
                                          "own data, sharing one frozen base")
    p.add_argument("jobs", help="TOML: [defaults] then one [[job]] table (name, data, out, "
                                "rank, lr, ...) per adapter")
    p.add_argument("--resume", action="store_true",
                   help="continue every job from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = ManyConfig.from_toml(args.jobs)
    result = train_many(config, resume=args.resume, progress=not args.no_progress)
    print(f"\n{'job':<16} {'steps':>6} {'loss':>8} {'eval loss':>10} {'EM':>6}  out")
    for line, job in zip(summary(result), config.jobs, strict=True):
        loss = f"{line['loss']:.4f}" if line["loss"] is not None else "-"
        ev = f"{line['eval_loss']:.4f}" if "eval_loss" in line else "-"
        em = f"{line['exact_match']:.0%}" if "exact_match" in line else "-"
        print(f"{line['job']:<16} {line['steps']:>6} {loss:>8} {ev:>10} {em:>6}  {job.out}"
              + (f"\n  stopped: {line['error']}" if line["error"] else ""))
    print(f"{len(config.jobs)} jobs in {result.seconds:.1f} s")
    if result.interrupted:
        print("interrupted; continue with --resume")
        return 130
    return 1 if result.errors else 0

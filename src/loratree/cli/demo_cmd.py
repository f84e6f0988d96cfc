"""``loratree demo``: train adapters for the bundled tasks and show base vs adapter."""

from __future__ import annotations

import argparse
import os
import sys
import time

from loratree.demo.run import DemoResult, run_demo, serve_command, store_of
from loratree.demo.tasks import TASKS

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train adapters for the bundled tasks on the embedded model")
    p.add_argument("--out", default="demo_out", help="where data, adapters and plots go")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--steps", type=int, default=40, help="training steps per task")
    p.add_argument("--method", choices=["lora", "prefix"], default="lora",
                   help="adapter kind: LoRA r=8 on all linear layers, or prefix-tuning")
    p.add_argument("--virtual-tokens", type=int, default=20,
                   help="prefix length per layer with --method prefix (default 20)")
    p.add_argument("--serve", action="store_true",
                   help="then serve the adapters in the chat app (http://127.0.0.1:8000/)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    results = run_demo(args.out, tasks=tasks, steps=args.steps, method=args.method,
                       virtual_tokens=args.virtual_tokens)
    report(results, args.out, time.perf_counter() - started)
    if args.serve:
        from loratree.cli.main import main

        return main(["serve", "--store", str(store_of(args.out))])
    return 0


def report(results: list[DemoResult], out: str, seconds: float) -> None:
    """The table, the samples, and last, how to chat with the adapters in the browser."""
    print(f"\n{'task':<10}{'base EM':>10}{'adapter EM':>12}  adapter")
    for r in results:
        print(f"{r.task:<10}{100 * r.base_exact_match:>9.0f}%{100 * r.adapter_exact_match:>11.0f}%"
              f"  {r.adapter}")
    for r in results:
        print(f"\n{r.task}: held-out samples (prompt | expected | base | adapter)")
        for prompt, ref, base, mine in r.samples:
            print(f"  {prompt}\n    expected: {ref}\n    base:     {_short(base)}"
                  f"\n    adapter:  {_short(mine)}")
    print(f"\ndemo took {seconds:.0f} s; adapters are PEFT format, "
          f"loss plots at <adapter>/loss.png")
    print("\nChat with them in your browser (pick a character, switch any time, compare):"
          f"\n  {serve_command(out, _program())}\n  then open http://127.0.0.1:8000/"
          "\n(or in one go: loratree demo --serve)")


def _program() -> str:
    """How the user ran loratree (``.venv/bin/loratree`` under ``make demo``)."""
    given = sys.argv[0] if sys.argv else ""
    return os.path.relpath(given) if os.path.basename(given) == "loratree" else "loratree"


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."

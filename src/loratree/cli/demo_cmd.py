"""``loratree demo``: train adapters for the bundled tasks and show base vs adapter."""

from __future__ import annotations

import argparse
import time

from loratree.demo.run import run_demo
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    results = run_demo(args.out, tasks=tasks, steps=args.steps, method=args.method,
                       virtual_tokens=args.virtual_tokens)
    print(f"\n{'task':<10}{'base EM':>10}{'adapter EM':>12}  adapter")
    for r in results:
        print(f"{r.task:<10}{100 * r.base_exact_match:>9.0f}%{100 * r.adapter_exact_match:>11.0f}%"
              f"  {r.adapter}")
    for r in results:
        print(f"\n{r.task}: held-out samples (prompt | expected | base | adapter)")
        for prompt, ref, base, mine in r.samples:
            print(f"  {prompt}\n    expected: {ref}\n    base:     {_short(base)}"
                  f"\n    adapter:  {_short(mine)}")
    print(f"\ndemo took {time.perf_counter() - started:.0f} s; adapters are PEFT format, "
          f"loss plots at <adapter>/loss.png")
    return 0


def _short(text: str, width: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."

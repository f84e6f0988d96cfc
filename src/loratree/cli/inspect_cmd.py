"""``loratree inspect [MODEL]``: adaptable layers and the rank plane as numbers."""

from __future__ import annotations

import argparse
from collections import Counter

from loratree import surgery
from loratree.models import load_base
from loratree.surgery.plan import DEFAULT_RANKS, STANDARD_TARGETS

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="adaptable layers, trainable parameters and file sizes")
    p.add_argument("model", nargs="?", help="HF directory or .gguf file (default: embedded)")
    p.add_argument("--targets", default="q_proj,v_proj",
                   help="comma-separated target patterns (default: q_proj,v_proj)")
    p.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)),
                   help="comma-separated ranks (default: 1..64)")
    p.add_argument("--plot", metavar="PNG", help="also draw the rank plane to this PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, _ = load_base(args.model)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    ranks = tuple(int(r) for r in args.ranks.split(","))
    total = sum(p.numel() for p in model.parameters())
    layers = surgery.adaptable_modules(model)
    print(f"model: {type(model).__name__}, {total:,} parameters, {len(layers)} adaptable layers")
    kinds = Counter((n.rsplit(".", 1)[-1], type(m).__name__) for n, m in layers.items())
    print(f"\n{'layer name':<24}{'type':<12}{'count':>6}  shape (first)")
    for (suffix, kind), count in kinds.items():
        first = next(m for n, m in layers.items() if n.rsplit(".", 1)[-1] == suffix)
        print(f"{suffix:<24}{kind:<12}{count:>6}  {tuple(first.weight.shape)}")
    plane = {",".join(targets): targets}
    plane.update({k: v for k, v in STANDARD_TARGETS.items() if v != targets})
    rows = surgery.rank_plane(model, plane, ranks)
    print(f"\ntargets {','.join(targets)}: trainable parameters and adapter file (fp32)")
    print(f"{'rank':>6}{'params':>14}{'% model':>10}{'file':>12}")
    for row in rows:
        if row.targets == ",".join(targets):
            print(f"{row.rank:>6}{row.params:>14,}{100 * row.fraction:>9.3f}%"
                  f"{_size(row.file_bytes):>12}")
    print("\nthe plane (% of model parameters trained; full fine-tuning = 100%)")
    print(f"{'targets':<14}" + "".join(f"{'r=' + str(r):>9}" for r in ranks))
    for label in dict.fromkeys(r.targets for r in rows):
        cells = [r for r in rows if r.targets == label]
        print(f"{label:<14}" + "".join(f"{100 * r.fraction:>8.3f}%" for r in cells))
    if args.plot:
        from loratree.plots import plot_rank_plane

        print(f"\nplot: {plot_rank_plane(rows, args.plot, type(model).__name__)}")
    return 0


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)

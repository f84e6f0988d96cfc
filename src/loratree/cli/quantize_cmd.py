"""``loratree quantize [MODEL] OUT``: save a base with its linear layers in 4-bit NF4."""

from __future__ import annotations

import argparse

from loratree import surgery
from loratree.config import QuantConfig
from loratree.models import load_base, save_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a base model's linear layers to NF4 and save it")
    p.add_argument("model", nargs="?", default=None,
                   help="HF directory, .gguf file, or 'embedded' (default: embedded)")
    p.add_argument("out", help="output directory (loads with `--model OUT` everywhere)")
    p.add_argument("--targets", default="all-linear",
                   help="comma-separated patterns of linear layers (default: all-linear, "
                        "which keeps the output head in float)")
    p.add_argument("--exclude", default="", help="comma-separated patterns to keep in float")
    p.add_argument("--block", type=int, default=64, help="values per absmax block (default 64)")
    p.add_argument("--double", action=argparse.BooleanOptionalAction, default=True,
                   help="double quantization of the block constants (default on)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    config = QuantConfig(targets=_split(args.targets), exclude=_split(args.exclude),
                         block=args.block, double=args.double)
    model, tokenizer = load_base(args.model)
    report = surgery.quantize(model, config)
    out = save_model(model, tokenizer, args.out)
    print(f"{report}\nsaved to {out}")
    return 0


def _split(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())

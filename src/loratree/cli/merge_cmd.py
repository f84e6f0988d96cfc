"""``loratree merge BASE ADAPTER OUT``: a merged model that plain transformers loads."""

from __future__ import annotations

import argparse

from loratree import surgery
from loratree.adapters import load_adapter
from loratree.models import load_base
from loratree.models.save import save_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base and save the model")
    p.add_argument("base", help="HF directory, .gguf file, or 'embedded'")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("out", help="output directory for the merged model")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base)
    slot = load_adapter(model, args.adapter)
    merged = surgery.merge_and_unload(model, slot)
    out = save_model(merged, tokenizer, args.out)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0

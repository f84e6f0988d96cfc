"""``loratree merge BASE ADAPTER OUT``: a merged model that plain transformers loads.

Over an NF4 base the merge is lossy, so it is explicit: ``--to float`` saves
dequant(W) + s B A as float weights (path a), ``--to nf4`` quantizes those again (path b).
Both print the weight error against the float merge, and with ``--eval-data`` the eval
loss before and after.
"""

from __future__ import annotations

import argparse

from loratree import surgery
from loratree.adapters import load_adapter
from loratree.models import load_base, save_model
from loratree.train.evaluate import file_loss

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge an adapter into its base and save the model")
    p.add_argument("base", help="HF directory (float or saved by `loratree quantize`), "
                                ".gguf file, or 'embedded'")
    p.add_argument("adapter", help="adapter directory (PEFT format)")
    p.add_argument("out", help="output directory for the merged model")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="quantize the base first, as `train --quantize nf4` did")
    p.add_argument("--to", choices=["float", "nf4"], default="float",
                   help="with an NF4 base: save float weights (default) or re-quantize to NF4")
    p.add_argument("--eval-data", metavar="JSONL",
                   help="report the eval loss on this data before and after merging")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    model, tokenizer = load_base(args.base)
    if args.quantize:
        surgery.quantize(model)
    slot = load_adapter(model, args.adapter)
    quantized = bool(surgery.nf4_layers(model))
    if args.to == "nf4" and not quantized:
        raise ValueError("--to nf4 needs an NF4 base (a `loratree quantize` output, or "
                         "--quantize nf4); to quantize a float merge, run loratree quantize "
                         "on the merged model")
    before = _loss(model, tokenizer, args.eval_data)
    if quantized:
        report = surgery.export_merged(model, slot, to=args.to)
        print(report)
    else:
        model = surgery.merge_and_unload(model, slot)
    after = _loss(model, tokenizer, args.eval_data)
    if before is not None and after is not None:
        print(f"eval loss on {args.eval_data}: {before:.5f} before merging (adapter on its "
              f"base), {after:.5f} merged ({after - before:+.5f})")
    out = save_model(model, tokenizer, args.out)
    print(f"merged {args.adapter} into {args.base}: {out}")
    return 0


def _loss(model, tokenizer, path: str | None) -> float | None:
    if path is None:
        return None
    if tokenizer is None:
        raise ValueError("--eval-data needs a tokenizer; the base has none")
    return file_loss(model, tokenizer, path)

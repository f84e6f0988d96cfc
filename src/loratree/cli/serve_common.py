"""What ``generate`` and ``chat`` share: a base model, a store, a cache, slots, an engine."""

from __future__ import annotations

import argparse

from loratree.adapters import AdapterStore
from loratree.models import load_base
from loratree.serve import Engine
from loratree.serve.cpu import CpuTuning, Piece
from loratree.serve.slot_table import SlotTable
from loratree.tree.cache import AdapterCache
from loratree.tree.store_source import serving_sources

__all__ = ["DEFAULT_STORE", "add_engine_args", "add_model_args", "build_engine", "parse_stop",
           "served_dirs"]

DEFAULT_STORE = "adapters"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The base model, the store, the cache and the slots."""
    p.add_argument("--model", default=None,
                   help="base model: HF directory, .gguf, or embedded (default)")
    p.add_argument("--store", default=None,
                   help="adapter store directory (default: ./adapters; serve: none when "
                        "--adapters-dir is given)")
    p.add_argument("--cache-mb", type=float, default=512.0,
                   help="RAM budget of the adapter cache in MiB (default 512)")
    p.add_argument("--slots", type=int, default=4, help="active adapter slots (default 4)")
    p.add_argument("--max-rank", type=int, default=64, help="largest LoRA rank a slot takes")
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together at most (default 8)")
    p.add_argument("--cpu-tuning", type=_cpu_tuning, default=CpuTuning(), metavar="PIECES",
                   help="CPU serving tuning: all (default), none, or comma-separated pieces "
                        f"of {', '.join(Piece)}; see bench.cpu_ablation for what each "
                        "gains on a host")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model arguments and one request's sampling settings."""
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text, without the chat template")


def served_dirs(args: argparse.Namespace) -> tuple[str | None, tuple[str, ...]]:
    """(store, plain adapter folders) the arguments name: ``--store``, else the default
    store unless ``--adapters-dir`` folders are given alone."""
    folders = tuple(getattr(args, "adapters_dir", None) or ())
    return (args.store if args.store is not None or folders else DEFAULT_STORE), folders


def build_engine(args: argparse.Namespace) -> tuple[Engine, object]:
    model, tokenizer = load_base(args.model)
    if tokenizer is None:
        raise ValueError("generation needs a tokenizer; the model directory has none")
    store, folders = served_dirs(args)
    source = serving_sources(AdapterStore(store) if store is not None else None, folders)
    cache = AdapterCache(source, int(args.cache_mb * 2**20))
    table = SlotTable(model, cache, n_slots=args.slots, max_rank=args.max_rank)
    return Engine(model, tokenizer, table, max_batch=args.max_batch,
                  cpu_tuning=args.cpu_tuning), tokenizer


def _cpu_tuning(text: str) -> CpuTuning | None:
    try:
        return CpuTuning.parse(text)
    except ValueError as e:  # argparse reports an ArgumentTypeError's message as given
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_stop(values: list[str]) -> tuple[str, ...]:
    return tuple(v.encode().decode("unicode_escape") for v in values)

"""``loratree train``: fine-tune an adapter (or every weight) on a JSONL file.

Every ``TrainConfig`` field is a flag (``max_steps`` -> ``--max-steps``); ``--config``
reads a TOML file first, and flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing

from loratree.train import TrainConfig, train

__all__ = ["add_parser", "config_from_args", "run"]

_ALIASES = {"eval_data": ["--eval"], "use_rslora": ["--rslora"], "use_dora": ["--dora"]}
_LISTS = {"targets": (str, "comma-separated target patterns (default: all-linear)"),
          "modules_to_save": (str, "comma-separated modules trained as full copies (lm_head)"),
          "trainable_tokens": (int, "comma-separated token ids whose embedding rows the "
                                    "adapter learns (PEFT's trainable_token_indices)")}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (or the full model) on JSONL")
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in OUT/checkpoints")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=None)
        elif f.name in _LISTS:
            item, text = _LISTS[f.name]
            p.add_argument(*flags, dest=f.name, default=None, type=_list_of(item), help=text)
        else:
            p.add_argument(*flags, dest=f.name, default=None, type=_scalar(kind),
                           help=f"default: {f.default}")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TOML (if given), then every flag that was set on the command line."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.config:
        return TrainConfig.from_toml(args.config, **overrides)
    return TrainConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    result = train(config, resume=args.resume, progress=True)
    if result.interrupted:
        print(f"interrupted at step {result.steps}; continue with --resume")
        return 130
    evals = ", ".join(f"{k} {v:.4f}" for k, v in result.eval.items())
    print(f"trained {result.steps} steps: train loss {result.train_loss:.4f}"
          + (f", {evals}" if evals else "") + f"\nsaved to {result.out}")
    return 0


def _list_of(item: type):
    """An argparse type: a comma-separated list of ``item``s, as a tuple."""
    def parse(s: str) -> tuple:
        try:
            return tuple(item(t.strip()) for t in s.split(",") if t.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{s!r}: expected a comma-separated list of "
                                             f"{item.__name__}") from e
    return parse


def _scalar(kind: object):
    args = typing.get_args(kind)
    if kind in (int, float, str):
        return kind
    if args and int in args:
        return int
    return str  # str | None, Literal[...]: validated by TrainConfig

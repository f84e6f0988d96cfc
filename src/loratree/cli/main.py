"""``loratree``: the entry point. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import logging
import sys

from loratree.cli import (
    chat_cmd,
    demo_cmd,
    export_cmd,
    generate_cmd,
    inspect_cmd,
    merge_cmd,
    quantize_cmd,
    serve_cmd,
    store_cmd,
    sweep_cmd,
    train_cmd,
    train_many_cmd,
    tree_cmd,
    vllm_cache_cmd,
)

__all__ = ["main"]

_COMMANDS = {
    "chat": chat_cmd,
    "demo": demo_cmd,
    "export": export_cmd,
    "generate": generate_cmd,
    "inspect": inspect_cmd,
    "merge": merge_cmd,
    "quantize": quantize_cmd,
    "serve": serve_cmd,
    "store": store_cmd,
    "sweep": sweep_cmd,
    "train": train_cmd,
    "train-many": train_many_cmd,
    "tree": tree_cmd,
    "vllm-cache": vllm_cache_cmd,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loratree",
        description="Train, merge, switch and serve many LoRA adapters on one frozen base.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.run(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        print(f"loratree {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

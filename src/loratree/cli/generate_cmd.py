"""``loratree generate --adapter NAME "prompt"``: one completion, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from loratree.cli.serve_common import add_engine_args, build_engine, parse_stop
from loratree.models.chat import Message, encode_prompt
from loratree.serve import FinishReason, Request

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion with a stored adapter")
    p.add_argument("prompt", help="the user message (or, with --raw, the exact text)")
    p.add_argument("--adapter", default="__base__",
                   help="adapter name in the store, __base__ (none), or auto (routed)")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    engine, tokenizer = build_engine(args)
    prompt = args.prompt if args.raw else encode_prompt([Message("user", args.prompt)],
                                                        tokenizer)
    handle = engine.submit(Request(prompt, adapter=args.adapter,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, seed=args.seed,
                                   stop=parse_stop(args.stop)))
    engine.start()
    try:
        for text in handle:
            sys.stdout.write(text)
            sys.stdout.flush()
        done = handle.result()
    finally:
        engine.close()
    if done.finish_reason == FinishReason.ERROR:
        raise ValueError(done.error)
    print()
    print(f"[{done.adapter}: {len(done.tokens)} tokens, {done.finish_reason}, "
          f"{done.total_s:.2f} s]", file=sys.stderr)
    return 0

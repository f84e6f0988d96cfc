"""``loratree chat``: talk to the base model or any stored adapter; switch with a command.

Commands: ``/adapter NAME`` (switch; prints how long activating took), ``/adapters``
(list the store), ``/base`` (no adapter), ``/reset`` (forget the conversation), ``/quit``.
"""

from __future__ import annotations

import argparse
import sys
import time

from loratree.cli.serve_common import add_engine_args, build_engine, parse_stop
from loratree.models.chat import Message, encode_prompt
from loratree.serve import FinishReason, Request
from loratree.serve.slot_table import BASE

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="interactive chat that can switch adapters")
    p.add_argument("--adapter", default=BASE, help="adapter to start with (default: none)")
    add_engine_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    engine, tokenizer = build_engine(args)
    store, table = engine.table.cache.store, engine.table
    adapter, history = args.adapter, []
    if adapter != BASE:
        _switch(table, adapter)
    print(f"chatting with {adapter}; /adapter NAME, /adapters, /base, /reset, /quit")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/adapters":
            for info in store.list():
                print(f"  {info.name}  {info.kind} r={info.rank}  {info.size:,} bytes")
            continue
        if line == "/reset":
            history = []
            print("(conversation cleared)")
            continue
        if line == "/base" or line.startswith("/adapter"):
            name = BASE if line == "/base" else line.removeprefix("/adapter").strip()
            try:
                _switch(table, name)
                adapter = name
            except (ValueError, KeyError, RuntimeError) as e:
                print(f"(cannot switch: {e})")
            continue
        history.append(Message("user", line))
        prompt = encode_prompt(history, tokenizer)
        done = engine.generate(Request(prompt, adapter=adapter,
                                       max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, top_k=args.top_k,
                                       top_p=args.top_p, seed=args.seed,
                                       stop=parse_stop(args.stop)))
        if done.finish_reason == FinishReason.ERROR:
            print(f"(error: {done.error})")
            history.pop()
            continue
        print(f"{adapter}> {done.text}")
        history.append(Message("assistant", done.text or " "))
    return 0


def _switch(table, name: str) -> None:
    started = time.perf_counter()
    table.activate(name)
    print(f"(switched to {name} in {1e3 * (time.perf_counter() - started):.2f} ms)")

"""``loratree vllm-cache prune``: delete the vLLM plugin's cache entries nothing needs.

The plugin writes one entry per content version of each name it resolves and never
deletes one while serving (a running vLLM may reload it). This command deletes those that
are no current version of the store's names and were last used more than ``--older-than``
days ago (``vllm_plugin.prune``).
"""

from __future__ import annotations

import argparse
import os

from loratree.vllm_plugin import (
    STORE_ENV,
    MaterialisedCache,
    cache_dir,
    existing_store,
    prune_cache,
)

__all__ = ["add_parser", "run"]

DAY_S = 86400.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vllm-cache", help="manage the vLLM plugin's cache of materialised "
                                          "adapters")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    prune = actions.add_parser(
        "prune", help="delete entries that no store name holds and that were not used for "
                      "--older-than days")
    prune.add_argument("--store", default=os.environ.get(STORE_ENV),
                       required=not os.environ.get(STORE_ENV),
                       help=f"the store the plugin serves (default: ${STORE_ENV})")
    prune.add_argument("--cache", default=None,
                       help="the cache directory (default: $LORATREE_VLLM_CACHE, else the "
                            "loratree cache's vllm/)")
    prune.add_argument("--older-than", type=float, default=7.0, metavar="DAYS",
                       help="keep entries used within this many days (default 7; a vLLM "
                            "that resolved a name before its replace still reloads the old "
                            "entry until that name is unloaded)")
    prune.add_argument("--dry-run", action="store_true",
                       help="list what would be deleted, delete nothing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    root = args.cache or cache_dir()
    cache = MaterialisedCache(existing_store(args.store), root)
    report = prune_cache(cache, args.older_than * DAY_S, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for name in report.removed:
        print(f"{verb} {name}")
    print(f"{verb} {len(report.removed)} entr{'y' if len(report.removed) == 1 else 'ies'} "
          f"({report.freed_bytes / 2**20:.1f} MiB) under {cache.root}; kept "
          f"{report.kept_current} current and {report.kept_recent} used within "
          f"{args.older_than:g} days")
    return 0

"""``loratree tree``: show a store's adapter tree, export a node flat, accept a stale node.

Nodes are trained with ``loratree train --parent NAME --node NAME/CHILD``.
"""

from __future__ import annotations

import argparse

from loratree.tree import Tree, render

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tree", help="show, export and accept the nodes of an adapter tree")
    p.add_argument("--store", default="adapters", help="store directory (default: ./adapters)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("show", help="draw the tree: each node's rank, path rank, size, eval "
                                    "metrics and staleness")
    export = actions.add_parser("export", help="write NODE's whole path as one flat PEFT "
                                               "adapter directory OUT (for PEFT or vLLM)")
    export.add_argument("node")
    export.add_argument("out")
    accept = actions.add_parser("accept", help="mark a stale NODE current: it builds on its "
                                               "parent path as that is now")
    accept.add_argument("node")
    path = actions.add_parser("path", help="NODE's path from its root, with ranks")
    path.add_argument("node")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    tree = Tree(args.store)
    if args.action == "show":
        views = tree.nodes()
        print(render(views))
        stale = sum(v.stale for v in views)
        print(f"{len(views)} adapter(s) in {tree.store.root}"
              + (f"; {stale} stale" if stale else ""))
    elif args.action == "export":
        out = tree.export(args.node, args.out)
        print(f"exported {args.node} (depth {tree.depth(args.node)}, rank "
              f"{tree.total_rank(args.node)}) to {out}")
    elif args.action == "accept":
        tree.accept(args.node)
        print(f"accepted {args.node}: it now builds on its parent path as it is")
    else:
        for depth, name in enumerate(tree.path(args.node)):
            info = tree.store.info(name)
            print(f"{'  ' * depth}{name}  rank {info.rank}  {info.size:,} bytes")
        print(f"path rank {tree.total_rank(args.node)}"
              + ("  STALE" if tree.stale(args.node) else ""))
    return 0

"""Adapter trees as a tool: browse, compose, export and accept the nodes of a store.

The node records, lineage and the composition itself live in ``loratree.adapters.tree``
(the cache, engine and trainer use them); this package is the application over them.
"""

from loratree.tree.view import NodeView, Tree, render

__all__ = ["NodeView", "Tree", "render"]

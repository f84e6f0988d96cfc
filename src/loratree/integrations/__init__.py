"""Code that imports an optional serving framework lives here and nowhere else.

Each sub-package is an optional extra (``ray``: ``pip install loratree[ray]``) and imports
its framework only when used, so the rest of loratree never needs it.
"""

__all__: list[str] = []

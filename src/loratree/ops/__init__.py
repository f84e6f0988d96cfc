"""Pure tensor functions: the math of loratree, with no module state and no I/O.

Every function's docstring gives a ``Semantics:`` line (the naive formula the tests check
against) and the ``Shape:`` of each argument.
"""

from loratree.ops import compose, dora, lora, nf4, prefix, skinny, slots

__all__ = ["compose", "dora", "lora", "nf4", "prefix", "skinny", "slots"]

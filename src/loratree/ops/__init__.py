"""Pure tensor functions: the math of loratree, with no module state and no I/O.

Every function's docstring gives a ``Semantics:`` line (the naive formula the tests check
against) and the ``Shape:`` of each argument.

``ops.skinny`` (GEMM orientations for few rows) is left out of this namespace: only the
opt-in CPU tuning of ``serve.cpu`` uses it.
"""

from loratree.ops import compose, dora, lora, nf4, prefix, slots

__all__ = ["compose", "dora", "lora", "nf4", "prefix", "slots"]

"""A tree path composed into one adapter.

A node's effective update is the sum of the updates along its path, and that sum is one
LoRA of the summed rank (``ops.compose.concat``), so a node fills one slot like any
adapter. The composed adapter is written with each module's scale folded into B and
``lora_alpha = r`` per module (scale 1), so PEFT and vLLM read it as a plain adapter.
"""

from __future__ import annotations

from loratree.adapters.files import AdapterFile
from loratree.adapters.peft_format import config_from_peft, config_to_peft
from loratree.adapters.summary import summarize
from loratree.errors import TreeError
from loratree.layers import SlotSpec
from loratree.ops import compose
from loratree.surgery.targets import pattern_value

__all__ = ["compose_files"]


def compose_files(files: list[AdapterFile], label: str = "") -> AdapterFile:
    """The adapters of a path (root first) as one adapter: per module, the ranks of the
    nodes that adapt it, concatenated, with each node's scale folded into its B columns.

    Raises:
        TreeError: two nodes disagree on a module's shapes, or on the base model.
    """
    if not files:
        raise TreeError(f"{label}: nothing to compose")
    if len(files) == 1:
        return files[0]
    if any(f.config.use_dora for f in files):
        raise TreeError(f"{label}: a DoRA adapter on a path does not compose into one LoRA "
                        "adapter (its magnitude rescales the sum, not one term)")
    if any(f.tokens for f in files):
        raise TreeError(f"{label}: adapters with trainable token rows replace rows rather "
                        "than add to them; they cannot be composed along a tree path")
    if any(f.pending or f.params for f in files):
        raise TreeError(f"{label}: adapters of fused parameters (target_parameters) cannot "
                        "be composed along a tree path yet")
    bases = {f.base_model for f in files} - {None}
    if len(bases) > 1:
        raise TreeError(f"{label}: the path's adapters were trained on different base models "
                        f"({', '.join(sorted(bases))})")
    pieces: dict[str, list[tuple]] = {}
    for f in files:
        for module, (a, b) in f.weights.items():
            spec = _spec(f, module, a.shape[0])
            pieces.setdefault(module, []).append((a, b, spec.scale))
    weights = {}
    for module, factors in pieces.items():
        try:
            weights[module] = compose.concat(factors)
        except ValueError as e:
            raise TreeError(f"{label}: {module!r}: {e}") from e
    specs = {m: SlotSpec(a.shape[0], float(a.shape[0])) for m, (a, _) in weights.items()}
    last = files[-1].raw_config
    raw = config_to_peft(summarize(specs), sorted(weights), base_model=bases.pop() if bases
                         else None, task_type=last.get("task_type"),
                         fan_in_fan_out=bool(last.get("fan_in_fan_out", False)))
    embeddings = frozenset().union(*(f.embeddings for f in files))
    return AdapterFile(config_from_peft(raw), weights, {}, raw, embeddings)


def _spec(f: AdapterFile, module: str, rank: int) -> SlotSpec:
    c = f.config
    alpha = float(pattern_value(c.alpha_pattern, module, c.alpha))
    return SlotSpec(rank, alpha, rslora=c.use_rslora)

"""What kind of attention each layer of a model has, as its config says.

transformers models say it per layer (``config.layer_types``: ``"full_attention"``,
``"sliding_attention"``, ...) or for the whole model (``sliding_window``, with
``use_sliding_window`` where the family can turn it off). loratree runs full and
sliding-window causal attention exactly (the window lives in the attention mask, every
layer's cache keeps every column); any other kind (chunked, linear, state-space layers) is
refused by ``check_attention`` with the family's name, never served wrong.
"""

from __future__ import annotations

from torch import nn

from loratree.errors import UnsupportedModelError

__all__ = ["SUPPORTED_LAYER_TYPES", "check_attention", "layer_windows", "sliding_window"]

SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def _text_config(model: nn.Module) -> object | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


def layer_windows(model: nn.Module) -> tuple[int | None, ...]:
    """Per decoder layer, its sliding window in tokens, or None for full attention (an
    empty tuple for a model without a transformers config). A query at sequence index i
    of a sliding layer with window w sees keys at indices j with i - w < j <= i."""
    cfg = _text_config(model)
    if cfg is None:
        return ()
    n = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    window = getattr(cfg, "sliding_window", None)
    if not getattr(cfg, "use_sliding_window", True):
        window = None
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return (window,) * n if window else (None,) * n
    return tuple(window if t == "sliding_attention" and window else None for t in types)


def sliding_window(model: nn.Module) -> int | None:
    """The window of the model's sliding layers, or None when every layer is full."""
    return next((w for w in layer_windows(model) if w is not None), None)


def check_attention(model: nn.Module) -> None:
    """Raise ``UnsupportedModelError`` naming the family and the layer kinds it has when
    any layer's attention is not one loratree runs exactly (full or sliding window)."""
    cfg = _text_config(model)
    if cfg is None:
        return
    family = getattr(cfg, "model_type", type(model).__name__)
    kinds = set(getattr(cfg, "layer_types", None) or ()) - SUPPORTED_LAYER_TYPES
    if getattr(cfg, "attention_chunk_size", None):
        kinds.add("chunked_attention")
    if kinds:
        raise UnsupportedModelError(
            f"{family}: layers of kind {', '.join(sorted(kinds))} are not supported "
            f"(loratree runs {', '.join(sorted(SUPPORTED_LAYER_TYPES))} exactly)")

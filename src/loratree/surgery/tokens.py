"""Trainable token rows (PEFT's ``trainable_token_indices``): find the modules, wrap them
(and a head tied to a wrapped embedding), list them."""

from __future__ import annotations

from torch import nn

from loratree.errors import TargetError
from loratree.layers import FullCopy, LoraModule, SlotContext, TokenRows

__all__ = ["input_embedding_name", "token_layers", "token_modules", "wrap_tokens"]

TokenIndices = tuple[int, ...] | dict[str, tuple[int, ...]]


def token_layers(model: nn.Module, *, tied: bool = True) -> dict[str, TokenRows]:
    """Every ``TokenRows`` of the model by the dotted name it replaces (``tied=False``:
    only those that hold rows, not the heads tied to them)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, TokenRows) and (tied or not m.tied)}


def input_embedding_name(model: nn.Module) -> str:
    """The dotted name of the model's input embedding (PEFT's target for a plain list of
    ids): ``get_input_embeddings()``, else the module named ``embed_tokens``."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    for name, module in model.named_modules():
        if emb is not None and module is emb:
            return name
    for name, _ in model.named_modules():
        if name == "embed_tokens" or name.endswith(".embed_tokens"):
            return name
    raise TargetError("trainable_token_indices: the model has no input embedding to hold "
                      "the token rows")


def token_modules(model: nn.Module, spec: TokenIndices) -> dict[str, tuple[int, ...]]:
    """The module each entry of ``trainable_token_indices`` names, with its ids: a list
    means the input embedding; a dict's key is a module name or a suffix after a dot that
    must select exactly one module."""
    if not spec:
        return {}
    if not isinstance(spec, dict):
        return {input_embedding_name(model): tuple(spec)}
    names = [n for n, _ in model.named_modules() if n]
    found: dict[str, tuple[int, ...]] = {}
    for key, ids in spec.items():
        hits = [n for n in names if (n == key or n.endswith("." + key))
                and not n.endswith(".base")]
        hits = [n for n in hits if not any(n.startswith(h + ".") for h in hits)]
        if len(hits) != 1:
            raise TargetError(f"trainable_token_indices[{key!r}] selects {len(hits)} modules "
                              f"({hits[:3]}); it must name exactly one")
        found[hits[0]] = tuple(ids)
    return found


def wrap_tokens(model: nn.Module, name: str, ctx: SlotContext) -> TokenRows:
    """The ``TokenRows`` at ``name``, wrapping the module there first if needed (and any
    Linear head that shares its table: tied weights)."""
    module = model.get_submodule(name)
    if isinstance(module, TokenRows):
        if module.tied:
            raise TargetError(f"{name}: this head is tied to {module.source.module_name}; "
                              "give the token rows to that embedding")
        return module
    if isinstance(module, LoraModule | FullCopy):
        raise TargetError(f"{name}: {type(module).__name__} already adapts this module; it "
                          "cannot also hold trainable tokens")
    try:
        layer = TokenRows(module, ctx, name)
    except TypeError as e:
        raise TargetError(str(e)) from e
    heads = _tied_heads(model, name, module)
    _replace(model, name, layer)
    for head in heads:
        _replace(model, head, TokenRows(model.get_submodule(head), ctx, head, tied_to=layer))
    return layer


def _tied_heads(model: nn.Module, name: str, module: nn.Module) -> list[str]:
    """The Linear modules other than ``module`` whose weight is its weight (a tied LM head);
    a tied head that LoRA or a full copy already wraps is refused."""
    heads = []
    for other, m in model.named_modules():
        if m is module or not isinstance(m, nn.Linear) or m.weight is not module.weight:
            continue
        parent = other.rpartition(".")[0]
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, LoraModule | FullCopy | TokenRows):
            raise TargetError(f"{name}: its table is tied to {parent!r}, which "
                              f"{type(owner).__name__} already wraps; trainable tokens need "
                              "that head plain")
        heads.append(other)
    return heads


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)

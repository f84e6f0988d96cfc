"""Trainable token rows in adapter files (PEFT's ``trainable_token_indices``): read and
checked without a model, checked against one, and gathered from a slot to save.

PEFT 0.21 keeps the ids in ``adapter_config.json`` (a list: the input embedding; a dict:
per module name) and the rows, ``(n, dim)`` in the ids' order, under
``<module>.token_adapter.trainable_tokens_delta``. A head tied to the embedding saves
nothing; it uses the embedding's rows. Each error names the key at fault.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from loratree.adapters.peft_format import token_key
from loratree.config import LoraConfig
from loratree.errors import (
    CorruptFileError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    TargetError,
    UnexpectedKeyError,
)
from loratree.layers import FullCopy, LoraModule, TokenRows
from loratree.surgery import input_embedding_name, token_layers, token_modules

__all__ = ["check_tokens_against", "read_tokens", "token_bytes", "token_tensors"]

Tokens = dict[str, tuple[Tensor, Tensor]]
"""Per module: (token ids ``(n,)`` long, rows ``(n, dim)``)."""


def _named(module: str, key: str) -> bool:
    return module == key or module.endswith("." + key)


def read_tokens(label: str, config: LoraConfig, found: dict[str, Tensor]) -> Tokens:
    """The token rows of a file (``found``: module -> rows, from its keys) with their ids
    from the config, checked: every entry of the config has its key and no key is left
    over; float, ``(n, dim)`` for n ids, finite."""
    spec = config.trainable_token_indices
    if not spec:
        if found:
            raise UnexpectedKeyError(f"{label}: {token_key(next(iter(found)))!r} holds "
                                     "trainable token rows, but the config sets no "
                                     "trainable_token_indices")
        return {}
    if isinstance(spec, dict):
        pairs = {}
        for module, rows in found.items():
            keys = [k for k in spec if _named(module, k)]
            if not keys:
                raise UnexpectedKeyError(f"{label}: {token_key(module)!r} names no entry of "
                                         f"trainable_token_indices ({sorted(spec)})")
            pairs[module] = (spec[keys[0]], rows)
        for k in spec:
            if not any(_named(m, k) for m in found):
                raise MissingKeyError(f"{label}: trainable_token_indices names {k!r}, but "
                                      f"{token_key(k)!r} is missing")
    else:
        if not found:
            raise MissingKeyError(f"{label}: the config sets trainable_token_indices, but "
                                  f"{token_key('<input embedding>')!r} is missing")
        if len(found) > 1:
            raise UnexpectedKeyError(f"{label}: {token_key(sorted(found)[1])!r}: a list of "
                                     "trainable_token_indices holds rows for one module "
                                     "only (the input embedding)")
        pairs = {m: (spec, rows) for m, rows in found.items()}
    return {m: _checked_rows(label, m, ids, rows) for m, (ids, rows) in pairs.items()}


def _checked_rows(label: str, module: str, ids: tuple[int, ...], rows: Tensor
                  ) -> tuple[Tensor, Tensor]:
    key = token_key(module)
    if not rows.is_floating_point():
        raise CorruptFileError(f"{label}: {key!r} holds {rows.dtype}; token rows are "
                               "floating point")
    if rows.dim() != 2 or rows.shape[0] != len(ids):
        raise ShapeMismatchError(f"{label}: {key!r} has shape {tuple(rows.shape)}; "
                                 f"trainable_token_indices gives {len(ids)} ids, so it must "
                                 f"be ({len(ids)}, dim)")
    if not torch.isfinite(rows).all():
        raise NonFiniteError(f"{label}: {key!r} holds NaN or Inf")
    return torch.tensor(ids, dtype=torch.long), rows


def check_tokens_against(label: str, model: nn.Module, config: LoraConfig, tokens: Tokens,
                         taken: set[str]) -> None:
    """Each module of ``tokens`` is one the config selects in ``model``, an embedding or a
    Linear head not adapted otherwise (``taken``: LoRA layers, full copies); its ids are
    in the table and its rows as wide."""
    try:
        selected = token_modules(model, config.trainable_token_indices)
    except TargetError as e:
        raise UnexpectedKeyError(f"{label}: {e}") from e
    for module, (ids, rows) in tokens.items():
        key = token_key(module)
        if module not in selected:
            raise UnexpectedKeyError(f"{label}: {key!r} names {module!r}, but "
                                     f"trainable_token_indices selects {sorted(selected)} in "
                                     "this model")
        base = model.get_submodule(module)
        if module in taken or isinstance(base, LoraModule | FullCopy) or (
                isinstance(base, TokenRows) and base.tied):
            raise UnexpectedKeyError(f"{label}: {key!r}: {module!r} is adapted otherwise "
                                     "(LoRA, modules_to_save or a tied head); it cannot also "
                                     "hold trainable tokens")
        table = base.base if isinstance(base, TokenRows) else base
        weight = getattr(table, "weight", None)
        if not isinstance(table, nn.Embedding | nn.Linear) or weight is None:
            raise UnexpectedKeyError(f"{label}: {key!r}: {module!r} is a "
                                     f"{type(base).__name__}, not an embedding or a head")
        vocab, dim = weight.shape
        if int(ids.max()) >= vocab:
            raise ShapeMismatchError(f"{label}: {key!r}: token id {int(ids.max())} of "
                                     "trainable_token_indices is outside the vocabulary "
                                     f"of {module!r} ({vocab} rows)")
        if rows.shape[1] != dim:
            raise ShapeMismatchError(f"{label}: {key!r} has shape {tuple(rows.shape)}, the "
                                     f"model's rows are {dim} wide")


def token_tensors(model: nn.Module, slot: int
                  ) -> tuple[dict[str, Tensor], tuple[int, ...] | dict[str, tuple[int, ...]]]:
    """A slot's token rows as PEFT's keys, and its ``trainable_token_indices``: a list when
    only the input embedding holds rows (PEFT's usual form), else a dict by module."""
    layers = {n: m for n, m in token_layers(model, tied=False).items() if m.has(slot)}
    tensors = {token_key(n): m.rows_of(slot).detach().contiguous().cpu()
               for n, m in layers.items()}
    ids = {n: tuple(m.ids_of(slot).tolist()) for n, m in layers.items()}
    if not ids:
        return tensors, ()
    if len(ids) == 1 and next(iter(ids)) == input_embedding_name(model):
        return tensors, next(iter(ids.values()))
    return tensors, ids


def token_bytes(tokens: Tokens, element_size: int | None = None) -> int:
    """What token rows take: as stored, or at ``element_size`` bytes a value."""
    return sum(r.numel() * (element_size or r.element_size()) + i.numel() * i.element_size()
               for i, r in tokens.values())

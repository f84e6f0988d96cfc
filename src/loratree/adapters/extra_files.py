"""Checks of the tensors an adapter file may carry beside A and B, as PEFT writes them:
a DoRA magnitude per module, ``lora_bias``'s bias of B, and ``modules_to_save``'s full
copies. Each raises the typed error that names the key at fault."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from loratree.adapters.peft_format import copy_key, magnitude_key, peft_key
from loratree.config import LoraConfig
from loratree.errors import (
    AdapterConfigError,
    CorruptFileError,
    MissingKeyError,
    NonFiniteError,
    ShapeMismatchError,
    UnexpectedKeyError,
)
from loratree.layers import FullCopy, SlotContext

__all__ = ["check_biases", "check_copies", "check_copy_shapes", "check_magnitude"]


def check_magnitude(path: Path, module: str, pair: dict[str, Tensor], config: LoraConfig
               ) -> Tensor:
    """One module's DoRA magnitude, checked: present exactly when the config says
    ``use_dora``, float, one finite value per output feature (B's rows), in PEFT's shape:
    ``(out,)``, or ``(1, out, 1, ...)`` for a convolution (a B of more than 2 dims)."""
    key = magnitude_key(module)
    if not config.use_dora:
        raise UnexpectedKeyError(f"{path.name}: {key!r} is a DoRA magnitude, but the config "
                                 "does not set use_dora")
    if "m" not in pair:
        raise MissingKeyError(f"{path.name}: the config sets use_dora, but {key!r} is missing")
    m, out = pair["m"], pair["b"].shape[0]
    if not m.is_floating_point():
        raise CorruptFileError(f"{path.name}: {key!r} holds {m.dtype}; a DoRA magnitude is "
                               "floating point")
    want = (out,) if pair["b"].dim() <= 2 else (1, out, *[1] * (pair["b"].dim() - 2))
    if tuple(m.shape) != want:
        raise ShapeMismatchError(f"{path.name}: {key!r} has shape {tuple(m.shape)}; DoRA on "
                                 f"this module needs {want} (one value per output feature)")
    if not torch.isfinite(m).all():
        raise NonFiniteError(f"{path.name}: {key!r} holds NaN or Inf")
    return m


def check_biases(label: str, config: LoraConfig, weights: dict[str, tuple[Tensor, Tensor]],
                  biases: dict[str, Tensor], embeddings: set[str]) -> None:
    """``lora_bias``: a bias of B's length for every adapted linear layer, or none at all."""
    for module, t in biases.items():
        key = peft_key(module, "bias", False)
        if not config.lora_bias:
            raise UnexpectedKeyError(f"{label}: {key!r} is a LoRA bias, but the config "
                                     "does not set lora_bias")
        if module not in weights or module in embeddings:
            raise UnexpectedKeyError(f"{label}: {key!r} has no LoRA linear layer to belong to")
        out = weights[module][1].shape[0]
        if not t.is_floating_point() or tuple(t.shape) != (out,):
            raise ShapeMismatchError(f"{label}: {key!r} has shape {tuple(t.shape)} "
                                     f"({t.dtype}), B's bias needs ({out},) floats")
    if config.lora_bias:
        for module in weights:
            if module in embeddings:
                raise AdapterConfigError(f"{label}: lora_bias is set but {module!r} is an "
                                         "embedding, which takes no LoRA bias")
            if module not in biases:
                raise MissingKeyError(f"{label}: lora_bias is set but "
                                      f"{peft_key(module, 'bias', False)!r} is missing")


def check_copies(label: str, copies: dict[str, dict[str, Tensor]]) -> None:
    """Each ``modules_to_save`` copy has a float weight (its shapes are checked against
    the model by ``check_against``)."""
    for module, parts in copies.items():
        if "weight" not in parts:
            raise MissingKeyError(f"{label}: {copy_key(module, 'bias')!r} comes without "
                                  f"{copy_key(module, 'weight')!r}")
        for param, t in parts.items():
            if not t.is_floating_point():
                raise CorruptFileError(f"{label}: {copy_key(module, param)!r} holds {t.dtype}; "
                                       "a module copy is floating point")


def check_copy_shapes(label: str, module: str, parts: dict[str, Tensor],
                       layer: FullCopy | None, model: nn.Module) -> None:
    if layer is None:
        try:
            layer = FullCopy(model.get_submodule(module), SlotContext(), module)
        except TypeError as e:
            raise UnexpectedKeyError(f"{label}: {copy_key(module, 'weight')!r}: {e}") from e
    want_w, want_b = layer.shapes()
    for param, want in (("weight", want_w), ("bias", want_b)):
        t = parts.get(param)
        got = None if t is None else tuple(t.shape)
        if got != want:
            key = copy_key(module, param)
            if t is None:
                raise MissingKeyError(f"{label}: {key!r} is missing (the module has a bias)")
            raise ShapeMismatchError(f"{label}: {key!r} has shape {got}, the model needs "
                                     f"{want if want is not None else 'no bias'}")

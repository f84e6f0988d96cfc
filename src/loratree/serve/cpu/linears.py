"""Put the measured GEMM orientation on a model's plain linears, reversibly.

``install_orientation`` gives each exact ``nn.Linear`` (a LoRA layer's base included) an
instance ``forward`` (``OrientedForward``) and returns the function that deletes it again.
The class, parameters, hooks and state-dict keys never change, so saving, merging and
injection see the model they were given, and once uninstalled nothing of the tuning is
left on it. Subclasses of ``nn.Linear`` (NF4, other libraries' layers) and linears that
already carry an instance ``forward`` are left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratree.serve.cpu.orientation import KERNELS, MAX_ROWS, OrientationTable

__all__ = ["OrientedForward", "Uninstall", "install_orientation", "oriented_linears"]

Uninstall = Callable[[], int]
"""Takes the installed forwards off again; returns how many it removed."""


class OrientedForward:
    """``y = x W^T + b`` as ``nn.Linear.forward``, but an input of few rows outside
    autograd on the CPU runs the kernel ``table`` measured faster for its shape. Training
    (grad enabled), other devices, another dtype and inputs of many rows take ``F.linear``.
    """

    def __init__(self, linear: nn.Linear, table: OrientationTable) -> None:
        self.linear, self.table = linear, table

    def __call__(self, x: Tensor) -> Tensor:
        lin = self.linear
        rows = x.numel() // lin.in_features if x.dim() > 1 else 1
        if (rows > MAX_ROWS or x.device.type != "cpu" or torch.is_grad_enabled()
                or x.dtype != lin.weight.dtype):
            return F.linear(x, lin.weight, lin.bias)
        return KERNELS[self.table.choose(lin, x, rows)](x, lin.weight, lin.bias)


def install_orientation(model: nn.Module, table: OrientationTable) -> Uninstall:
    """Give every exact ``nn.Linear`` under ``model`` an ``OrientedForward`` over
    ``table``; returns the uninstaller (idempotent, like the install)."""
    installed: list[nn.Linear] = []
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = OrientedForward(module, table)
            installed.append(module)

    def uninstall() -> int:
        removed = 0
        for module in installed:
            if isinstance(vars(module).get("forward"), OrientedForward):
                del module.forward
                removed += 1
        installed.clear()
        return removed

    return uninstall


def oriented_linears(model: nn.Module) -> list[nn.Linear]:
    """The linears under ``model`` that run an ``OrientedForward``."""
    return [m for m in model.modules()
            if isinstance(vars(m).get("forward"), OrientedForward)]

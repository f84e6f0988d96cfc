"""Crash-safe checkpoints: everything needed to resume a run exactly, with no pickle.

A checkpoint is a directory ``checkpoints/step-00000120/`` holding

- ``trainable.safetensors``: every trainable tensor, by parameter name;
- ``adapter/``: the adapter in PEFT's format (LoRA runs), for use as is;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state, tensors and the rest;
- ``rng.safetensors``: torch's RNG states; ``trainer.json``: step, data position,
  scheduler and Python RNG state, and the caller's ``extra`` JSON (``read_extra``).

It is written into a temp directory, every file fsynced, then renamed into place and the
parent fsynced, so a directory named ``step-*`` is always complete; a crash mid-write
leaves only a ``.tmp`` directory, which resume ignores and the next save removes.
Nothing non-finite is ever written: the save refuses and names the tensor.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from loratree.adapters.safetensors_io import read_safetensors
from loratree.errors import NonFiniteError
from loratree.fsio import atomic_dir

__all__ = ["Position", "latest_checkpoint", "load_checkpoint", "read_extra", "save_checkpoint"]

logger = logging.getLogger(__name__)

_PREFIX = "step-"


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimizer steps done, and the next batch of the data order."""

    step: int
    epoch: int
    batch: int


def save_checkpoint(
    root: Path,
    position: Position,
    trainable: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    keep_last: int,
    write_adapter: Callable[[Path], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write one complete checkpoint atomically and keep only the newest ``keep_last``.

    ``extra`` (JSON-serializable) is stored as is; ``read_extra`` gives it back.
    """
    root.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    for name, t in {**trainable, **opt_tensors}.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"checkpoint at step {position.step}: {name} is not finite")
    final = root / f"{_PREFIX}{position.step:08d}"
    with atomic_dir(final) as tmp:
        save_file(_cpu(trainable), str(tmp / "trainable.safetensors"))
        save_file(_cpu(opt_tensors), str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta))
        save_file(_rng_tensors(), str(tmp / "rng.safetensors"))
        if write_adapter is not None:
            write_adapter(tmp / "adapter")
        trainer = {
            "position": position.__dict__,
            "scheduler": scheduler.state_dict(),
            "python_rng": _json_rng(random.getstate()),
            "extra": dict(extra or {}),
        }
        (tmp / "trainer.json").write_text(json.dumps(trainer))
    _prune(root, keep_last)
    logger.info("checkpoint %s", final)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None. Temp directories are ignored."""
    if not root.is_dir():
        return None
    done = sorted(
        p for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and (p / "trainer.json").is_file()
    )
    return done[-1] if done else None


def read_extra(path: Path) -> dict[str, Any]:
    """The ``extra`` a checkpoint was saved with ({} if none), read before loading it."""
    return json.loads((path / "trainer.json").read_text()).get("extra", {})


def load_checkpoint(
    path: Path,
    trainable: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> Position:
    """Restore parameters, optimizer, scheduler and RNG states; return the data position."""
    saved = read_safetensors(path / "trainable.safetensors")
    if set(saved) != set(trainable):
        missing, extra = sorted(set(trainable) - set(saved)), sorted(set(saved) - set(trainable))
        raise ValueError(f"{path.name}: parameters differ (missing {missing}, unexpected {extra})")
    for name, p in trainable.items():
        if saved[name].shape != p.shape:
            raise ValueError(f"{path.name}: {name} is {tuple(saved[name].shape)} in the "
                             f"checkpoint, {tuple(p.shape)} in the model (a different rank?)")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(saved[name])
    opt_tensors = read_safetensors(path / "optimizer.safetensors")
    opt_meta = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer(opt_tensors, opt_meta))
    trainer = json.loads((path / "trainer.json").read_text())
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng(read_safetensors(path / "rng.safetensors"))
    random.setstate(_tuple_rng(trainer["python_rng"]))
    return Position(**trainer["position"])


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = s
    return states


def _set_rng(states: dict[str, Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(states) if k.startswith("cuda_")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _json_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _tuple_rng(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _cpu(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(f".{_PREFIX}*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)

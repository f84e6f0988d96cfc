"""Rank growth during training ("start low, raise if needed"): the policy and its state.

After each evaluation, ``Grower.after_eval`` looks at the eval loss (lower is better). An
evaluation improves on the best so far when it is lower by more than ``grow_tolerance``.
After ``grow_patience`` evaluations without improvement the rank of the trained slot is
doubled (``surgery.grow_slot``: same function, same scale, optimizer state of the old
entries kept), unless

- the last growth did not help (no improvement since it), or
- doubling would pass ``grow_max_rank``;

then training stops early. Each growth and the stop are logged and written to
``metrics.jsonl`` (``grow_from`` / ``grow_to``; ``stopped_early``). The state goes into
every checkpoint, so a resumed run regrows the model to the checkpoint's rank before
loading its tensors (``Grower.resume``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from loratree import surgery
from loratree.train.config import TrainConfig
from loratree.train.metrics import MetricsLog

__all__ = ["Grower"]

logger = logging.getLogger(__name__)

Action = Literal["train", "grow", "stop"]

_STATE = ("ranks", "best", "stale", "helped", "stopped")
"""The fields a checkpoint keeps."""


@dataclass
class Grower:
    """The growth policy over one run; mutable, saved with each checkpoint."""

    patience: int
    tolerance: float
    max_rank: int
    ranks: list[int]
    """The rank history: the start rank, then each grown rank."""
    slot: int = 0
    best: float = math.inf
    """The lowest eval loss that counted as an improvement."""
    stale: int = 0
    """Evaluations since the last improvement (or growth)."""
    helped: bool = True
    """Whether the eval loss improved since the last growth (True before any growth)."""
    stopped: str = ""
    """Why training stopped early; empty while it goes on."""

    @classmethod
    def from_config(cls, c: TrainConfig, slot: int = 0) -> Grower:
        return cls(c.grow_patience, float(c.grow_tolerance), c.grow_max_rank, [c.rank], slot)

    @property
    def rank(self) -> int:
        return self.ranks[-1]

    def decide(self, eval_loss: float) -> Action:
        """Update the state with one evaluation and say what to do next (no model change)."""
        if eval_loss < self.best - self.tolerance:
            self.best, self.stale, self.helped = eval_loss, 0, True
            return "train"
        self.stale += 1
        if self.stale < self.patience:
            return "train"
        if not self.helped:
            self.stopped = (f"growing to rank {self.rank} did not lower the eval loss below "
                            f"{self.best:.4f} by more than {self.tolerance:g}")
            return "stop"
        if 2 * self.rank > self.max_rank:
            self.stopped = (f"the eval loss stalled at rank {self.rank}, and rank "
                            f"{2 * self.rank} would pass grow_max_rank {self.max_rank}")
            return "stop"
        return "grow"

    def after_eval(self, eval_loss: float, step: int, model: nn.Module,
                   optimizer: torch.optim.Optimizer, metrics: MetricsLog) -> bool:
        """Decide, and grow the model's slot if that is the decision; True means stop."""
        action = self.decide(eval_loss)
        if action == "grow":
            report = surgery.grow_slot(model, self.slot, 2, optimizer, max_rank=self.max_rank)
            self.ranks.append(report.new_rank)
            self.stale, self.helped = 0, False
            logger.info("step %d: eval loss %.4f, no improvement on %.4f for %d evaluation(s): "
                        "growing %s", step, eval_loss, self.best, self.patience, report)
            metrics.write(step=step, grow_from=report.old_rank, grow_to=report.new_rank)
        elif action == "stop":
            logger.info("step %d: stopping early: %s", step, self.stopped)
            metrics.write(step=step, stopped_early=self.stopped)
        return action == "stop"

    def state_dict(self) -> dict[str, Any]:
        """The state as JSON (an infinite ``best`` as None)."""
        state = {k: getattr(self, k) for k in _STATE}
        state["best"] = None if math.isinf(self.best) else self.best
        return state

    def resume(self, state: dict[str, Any] | None, model: nn.Module) -> None:
        """Take the state saved in a checkpoint and regrow ``model`` (still at the start
        rank) to the checkpoint's rank, so its tensors fit. None: the checkpoint was saved
        without growth; the state stays fresh."""
        if not state:
            return
        ranks = [int(r) for r in state["ranks"]]
        if ranks[0] != self.rank or ranks[-1] % ranks[0]:
            raise ValueError(f"the checkpoint's run started at rank {ranks[0]} and grew to "
                             f"{ranks[-1]}; this run starts at rank {self.rank}")
        if ranks[-1] != ranks[0]:
            surgery.grow_slot(model, self.slot, ranks[-1] // ranks[0])
        self.ranks = ranks
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.stale, self.helped = int(state["stale"]), bool(state["helped"])
        self.stopped = str(state["stopped"])

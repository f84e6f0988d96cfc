"""PNG plots for things a person would rather look at than read."""

from __future__ import annotations

import logging
from pathlib import Path

from loratree.fsio import atomic_write
from loratree.surgery.plan import PlanRow

__all__ = ["plot_losses", "plot_rank_plane"]

logger = logging.getLogger(__name__)


def plot_rank_plane(rows: list[PlanRow], path: str | Path, title: str = "") -> Path:
    """Trainable parameters (as % of the model) over target set x rank, as a heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.targets for r in rows))
    ranks = sorted({r.rank for r in rows})
    grid = [[0.0] * len(ranks) for _ in labels]
    for r in rows:
        grid[labels.index(r.targets)][ranks.index(r.rank)] = 100.0 * r.fraction
    fig, ax = plt.subplots(figsize=(1.1 * len(ranks) + 2, 0.6 * len(labels) + 1.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(ranks)), [str(r) for r in ranks])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("rank r")
    ax.set_ylabel("adapted matrices")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2g}%", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="trainable parameters, % of model (full fine-tuning = 100%)")
    ax.set_title(title or "The rank plane")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def plot_losses(records: list[dict], path: str | Path) -> Path | None:
    """Train and eval loss per step from metrics records; None if there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path

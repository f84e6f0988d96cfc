"""What a sweep found, and how it is shown: rows, the recommendation, table, JSON, CSV, plot.

Everything here is pure or writes files; nothing trains. ``recommend`` picks the
configuration with the fewest trainable parameters whose held-out exact match is within
``tolerance`` points of the best (full fine-tuning included); ties in parameters go to the
higher exact match, then the lower eval loss, then the earlier row.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratree.fsio import atomic_write
from loratree.sweep.grid import SweepConfig

__all__ = ["FULL", "SweepResult", "SweepRow", "markdown_table", "plot_sweep", "recommend",
           "recommendation_line", "write_reports"]

logger = logging.getLogger(__name__)

FULL = "full fine-tuning"
"""The name (and target-set label) of the full fine-tuning row."""
_EPS = 1e-9
"""Slack on the tolerance edge: exact matches are fractions k/n, tolerances are decimals."""


@dataclass(frozen=True)
class SweepRow:
    """One configuration of the plane, measured."""

    name: str
    """``"q,v r=4"``, or ``"full fine-tuning"``."""
    targets: str
    """The target set's name; ``"full fine-tuning"`` for the far corner."""
    rank: int | None
    """None for full fine-tuning."""
    trainable_params: int
    adapter_bytes: int | None
    """Bytes of ``adapter_model.safetensors`` (full fine-tuning: of the saved model's
    safetensors files); None if nothing was saved."""
    eval_loss: float | None
    exact_match: float | None
    """Held-out exact match, 0..1."""
    step_seconds: float | None
    """Median wall time of one solo optimizer step (see ``loratree.sweep.run``)."""
    out: str
    error: str | None = None

    @property
    def full(self) -> bool:
        return self.rank is None


@dataclass(frozen=True)
class SweepResult:
    config: SweepConfig
    rows: tuple[SweepRow, ...]
    recommended: SweepRow | None
    model_params: int
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of the phases: "full", "lora" (the fused pass), "timing", "total"."""


def recommend(rows: Sequence[SweepRow], tolerance: float) -> SweepRow | None:
    """The row with the fewest trainable parameters whose exact match is within
    ``tolerance`` points (percentage points: 2.0 = 0.02) of the best; None if no row was
    scored."""
    scored = [(i, r) for i, r in enumerate(rows) if r.error is None and r.exact_match is not None]
    if not scored:
        return None
    best = max(r.exact_match for _, r in scored)
    good = [(i, r) for i, r in scored if best - r.exact_match <= tolerance / 100 + _EPS]
    loss = lambda r: r.eval_loss if r.eval_loss is not None else math.inf  # noqa: E731
    return min(good, key=lambda ir: (ir[1].trainable_params, -ir[1].exact_match,
                                     loss(ir[1]), ir[0]))[1]


_COLUMNS = ("configuration", "targets", "rank", "trainable params", "% of model",
            "adapter bytes", "eval loss", "exact match", "step time")


def markdown_table(result: SweepResult) -> str:
    """The table as markdown, the recommended row marked."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        name = r.name + (" **(recommended)**" if r is result.recommended else "")
        if r.error:
            name += f" (stopped: {r.error})"
        cells = [name, r.targets, "—" if r.rank is None else str(r.rank),
                 f"{r.trainable_params:,}",
                 f"{100 * r.trainable_params / max(result.model_params, 1):.3g}%",
                 "—" if r.adapter_bytes is None else f"{r.adapter_bytes:,}",
                 _num(r.eval_loss, "{:.4f}"), _num(r.exact_match, "{:.1%}"),
                 _num(None if r.step_seconds is None else 1e3 * r.step_seconds, "{:.1f} ms")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recommendation_line(result: SweepResult) -> str:
    """One sentence: what to train, and why."""
    r, tol = result.recommended, result.config.tolerance
    if r is None:
        return "no recommendation: no configuration was scored"
    best = max(x.exact_match for x in result.rows if x.exact_match is not None and not x.error)
    return (f"recommended: {r.name} ({r.trainable_params:,} trainable parameters, exact match "
            f"{r.exact_match:.1%}; the best is {best:.1%}, tolerance {tol:g} points)")


def _num(value: float | None, form: str) -> str:
    return "—" if value is None or not math.isfinite(value) else form.format(value)


def write_reports(result: SweepResult, out: str | Path) -> dict[str, Path]:
    """``sweep.md``, ``sweep.csv``, ``sweep.json`` and ``sweep.png`` in ``out``, each
    written atomically; their paths by kind."""
    out = Path(out)
    paths = {kind: out / f"sweep.{kind}" for kind in ("md", "csv", "json", "png")}
    text = (f"# Rank sweep: {len(result.rows)} configurations, {result.config.steps} steps "
            f"of batch {result.config.batch_size}\n\n{markdown_table(result)}\n"
            f"{recommendation_line(result)}\n\n![exact match against trainable parameters]"
            f"(sweep.png)\n")
    atomic_write(paths["md"], lambda tmp: tmp.write_text(text, encoding="utf-8"))
    atomic_write(paths["csv"], lambda tmp: tmp.write_text(_csv(result), encoding="utf-8"))
    blob = json.dumps(_json(result), indent=2) + "\n"
    atomic_write(paths["json"], lambda tmp: tmp.write_text(blob, encoding="utf-8"))
    plot_sweep(result, paths["png"])
    return paths


def _csv(result: SweepResult) -> str:
    buffer = io.StringIO()
    names = [f.name for f in dataclasses.fields(SweepRow)] + ["recommended"]
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({**dataclasses.asdict(r), "recommended": r is result.recommended})
    return buffer.getvalue()


def _json(result: SweepResult) -> dict[str, Any]:
    return {"config": result.config.to_dict(), "model_params": result.model_params,
            "tolerance_points": result.config.tolerance,
            "recommended": result.recommended.name if result.recommended else None,
            "seconds": result.seconds,
            "rows": [dataclasses.asdict(r) for r in result.rows]}


def plot_sweep(result: SweepResult, path: str | Path) -> Path:
    """Exact match against trainable parameters (log x), one line per target set, full
    fine-tuning a star and a dashed horizontal line, the recommendation circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    done = [r for r in result.rows if r.exact_match is not None and r.error is None]
    for k, name in enumerate(dict.fromkeys(r.targets for r in done if not r.full)):
        line = sorted((r for r in done if r.targets == name), key=lambda r: r.trainable_params)
        xs, ys = [r.trainable_params for r in line], [100 * r.exact_match for r in line]
        (drawn,) = ax.plot(xs, ys, "o-", label=name)
        for r, x, y in zip(line, xs, ys, strict=True):  # sets share x values: stagger labels
            ax.annotate(f"r={r.rank}", (x, y), textcoords="offset points",
                        xytext=(0, 6 + 9 * (k % 3)), ha="center", fontsize=7,
                        color=drawn.get_color())
    for r in (r for r in done if r.full):
        ax.axhline(100 * r.exact_match, color="k", ls="--", lw=1)
        ax.plot([r.trainable_params], [100 * r.exact_match], "k*", ms=14, label=FULL)
    if result.recommended is not None and result.recommended in done:
        rec = result.recommended
        ax.plot([rec.trainable_params], [100 * rec.exact_match], "o", ms=16, mfc="none",
                mec="red", mew=2, label=f"recommended: {rec.name}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(-3, 112)  # room above 100% for the staggered rank labels
    ax.set_yticks(range(0, 101, 20))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    c = result.config
    ax.set_title(f"The rank plane: {c.steps} steps of batch {c.batch_size} per configuration")
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    logger.info("wrote %s", path)
    return path

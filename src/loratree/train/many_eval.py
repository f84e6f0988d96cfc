"""Held-out evaluation of the jobs of a fused run (``train.many``), together.

Jobs due for evaluation at the same step share their greedy generation batches, each row
through its own job's slot: decoding a few rows leaves a CPU's matmuls far from their
speed, so the jobs' generations in one batch cost well under one solo evaluation each.
Each job's eval loss runs through its slot alone.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loratree import surgery
from loratree.train.data import pad_token_id
from loratree.train.evaluate import eval_loss, exact_match

if TYPE_CHECKING:
    from loratree.train.many import Job, ManyRun

__all__ = ["evaluate_job", "evaluate_jobs"]


def evaluate_job(run: ManyRun, job: Job) -> dict[str, float]:
    """Eval loss and exact match of one job's adapter (its slot alone)."""
    return evaluate_jobs(run, [job])[job.name]


def evaluate_jobs(run: ManyRun, jobs: Sequence[Job]) -> dict[str, dict[str, float]]:
    """Each job's eval loss (its slot alone) and exact match, the jobs' greedy generations
    sharing batches: each batch holds up to 16 rows (the solo batch) of every job with the
    same ``max_new_tokens``, each row through its job's slot. Decoding a few rows leaves
    the CPU's matmuls far from their speed, so 4 jobs' evaluations in one batch cost well
    under 4 solo ones; each answer is the one its job's solo run gives."""
    results: dict[str, dict[str, float]] = {job.name: {} for job in jobs}
    jobs = [job for job in jobs if job.eval_data is not None]
    if not run.dist.main or not jobs:
        return results
    for job in jobs:
        c = job.config
        with surgery.context(run.model).use(job.slot):
            results[job.name] = {"eval_loss": eval_loss(
                run.model, job.eval_data.examples, batch_size=c.batch_size,
                pad_id=pad_token_id(run.tokenizer), device=run.dist.device,
                precision=c.precision)}
    scored = [j for j in jobs if j.config.eval_examples and j.eval_rows is not None]
    for budget in sorted({j.config.max_new_tokens for j in scored}):
        group = [j for j in scored if j.config.max_new_tokens == budget]
        rows = {j.name: j.eval_rows.rows[: j.config.eval_examples] for j in group}
        _, pairs = exact_match(
            run.model, run.tokenizer, [r for j in group for r in rows[j.name]],
            max_new_tokens=budget, batch_size=16 * len(group), device=run.dist.device,
            slots=[j.slot for j in group for _ in rows[j.name]])
        pairs_left = iter(pairs)
        for job in group:
            hits = sum(a == r for a, r in itertools.islice(pairs_left, len(rows[job.name])))
            results[job.name]["exact_match"] = hits / max(len(rows[job.name]), 1)
    for job in jobs:
        job.evals = results[job.name]
        job.metrics.write(step=job.position.step, **results[job.name])
    return results

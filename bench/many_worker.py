"""``python -m bench.many_worker MODE DATA OUT [JOB]``: one variant of the fused-training
benchmark in a fresh process; prints one JSON line with its wall time in the trainer
(process start, imports and model load excluded; each job's held-out evaluation at its
last step and its save with the routing centroid included, and timed on their own as
``eval`` and ``save``), peak RSS (VmHWM) and per-job
held-out figures. The caller times the whole process as well: that is the end-to-end time
a user of ``loratree train-many`` / ``loratree train`` waits.

MODE: ``fused`` (the 4 jobs in one ``train_many``), ``solo JOB`` (one job alone through
``train``, as ``loratree train`` runs it: 4 of them one after another are the sequential
variant, 4 at once the concurrent one), ``peft`` (4 PEFT LoRA runs one after another in
one process, same data, batches, optimizer and steps; training only, as PEFT has no
evaluation loop), ``inprocess`` (one fused step against the same 4 jobs' solo steps,
interleaved in one process; and one forward/backward over 16 rows against 4 over 4 rows,
which is all a fused pass could gain).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from bench.rss import _status_kib
from loratree.models import load_base
from loratree.train import TrainConfig, fit, save, setup
from loratree.train.many import ManyConfig, fit_many, setup_many

JOBS = (("dates", 0), ("numbers", 0), ("pirate", 0), ("dates", 1))
"""(demo task, seed): four jobs; the fourth is a second dates adapter from another seed."""
STEPS, BATCH, RANK, LR = 30, 4, 8, 1e-3


def job_configs(data: Path, out: Path) -> tuple[tuple[str, ...], tuple[TrainConfig, ...]]:
    names, configs = [], []
    for task, seed in JOBS:
        name = f"{task}-s{seed}"
        names.append(name)
        configs.append(TrainConfig(
            data=str(data / task / "train.jsonl"), eval_data=str(data / task / "eval.jsonl"),
            out=str(out / name), rank=RANK, alpha=2.0 * RANK, targets=("all-linear",),
            batch_size=BATCH, max_length=128, max_steps=STEPS, warmup_steps=3, lr=LR,
            seed=seed, eval_every=STEPS, save_every=STEPS, keep_last=1, eval_examples=30))
    return tuple(names), tuple(configs)


def _fused(data: Path, out: Path) -> dict:
    """The 4 jobs in one ``fit_many``, each evaluated at its last step as configured (the
    jobs are due together, so they evaluate together), then saved by ``fit_many``; the
    saves (each with its routing centroid) are timed on their own as ``save``."""
    from loratree.train import many

    names, configs = job_configs(data, out)
    run = setup_many(ManyConfig(names, configs))
    saving = [0.0]
    save_job = many.save_job

    def timed_save(*args: object) -> Path:
        t = time.perf_counter()
        try:
            return save_job(*args)
        finally:
            saving[0] += time.perf_counter() - t

    many.save_job = timed_save  # fit_many looks it up at call time
    t0 = time.perf_counter()
    result = fit_many(run, progress=False)
    wall = time.perf_counter() - t0
    return {"wall": wall, "eval": result.eval_seconds, "save": saving[0],
            "quality": result.evals}


def _solo(data: Path, out: Path, index: int) -> dict:
    """Job ``index`` alone through ``fit`` and ``save``, as ``loratree train`` runs it:
    the base loaded for it alone, the job evaluated at its last step as configured, then
    saved with its routing centroid (timed as ``save``, inside ``wall`` as in the fused
    run)."""
    names, configs = job_configs(data, out)
    base, tokenizer = load_base(None)
    run = setup(configs[index], model=base, tokenizer=tokenizer)
    t0 = time.perf_counter()
    result = fit(run, progress=False)
    t1 = time.perf_counter()
    save(run)
    wall = time.perf_counter() - t0
    return {"wall": wall, "eval": result.eval_seconds, "save": time.perf_counter() - t1,
            "quality": {names[index]: result.eval}}


def _peft(data: Path, out: Path) -> dict:
    import peft

    from loratree.models.chat import encode
    from loratree.train.data import batch_order, collate, pad_token_id, read_jsonl
    from loratree.train.steps import label_tokens, loss_sum

    _, configs = job_configs(data, out)
    base, tokenizer = load_base(None)
    pad = pad_token_id(tokenizer)
    wall = 0.0
    for c in configs:
        torch.manual_seed(c.seed)
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        examples = encode(read_jsonl(c.data), tokenizer, c.max_length).examples
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=c.lr, foreach=True)  # as ours (train.steps.adamw)
        order = batch_order(len(examples), c.batch_size, seed=c.seed, epoch=0)
        t0 = time.perf_counter()
        for step in range(c.max_steps):
            batch_ex = [examples[i] for i in order[step % len(order)]]
            batch = collate(batch_ex, pad)
            (loss_sum(model, batch, "fp32") / label_tokens(batch_ex)).backward()
            torch.nn.utils.clip_grad_norm_(params, c.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        wall += time.perf_counter() - t0
    return {"wall": wall, "eval": 0.0, "save": 0.0, "quality": {}}


def _inprocess(data: Path, out: Path, rounds: int = 7) -> dict:
    from loratree import surgery
    from loratree.train import checkpoint as ckpt
    from loratree.train.data import pad_token_id
    from loratree.train.loop import next_batch
    from loratree.train.many import _fused_step
    from loratree.train.steps import label_tokens, optimizer_step

    names, configs = job_configs(data, out)
    configs = tuple(TrainConfig(**{**c.to_dict(), "eval_data": None, "max_steps": 10**6})
                    for c in configs)
    base, tokenizer = load_base(None)
    pad = pad_token_id(tokenizer)
    fused = setup_many(ManyConfig(names, configs), model=copy.deepcopy(base),
                       tokenizer=tokenizer)
    solos = [setup(c, model=copy.deepcopy(base), tokenizer=tokenizer) for c in configs]
    positions = [ckpt.Position(0, 0, 0) for _ in solos]

    def fused_step() -> None:
        _fused_step(fused, fused.jobs, pad)
        for job in fused.jobs:
            p = job.position
            job.position = ckpt.Position(p.step + 1, p.epoch, p.batch + 1)

    def solo_steps() -> None:
        for i, run in enumerate(solos):
            p, examples = next_batch(run.train_data, run.config, positions[i])
            optimizer_step(run.model, examples, step=p.step + 1,
                           total_tokens=label_tokens(examples), world=1, grad_accum=1,
                           pad_id=pad, device=torch.device("cpu"), precision="fp32",
                           params=list(run.params.values()), optimizer=run.optimizer,
                           clip_norm=run.config.clip_norm)
            run.scheduler.step()
            positions[i] = ckpt.Position(p.step + 1, p.epoch, p.batch + 1)

    model = solos[0].model  # the bound: one slot, random rows of equal length
    ids = torch.randint(0, base.config.vocab_size, (16, 56),
                        generator=torch.Generator().manual_seed(0))

    def pass_over(rows: torch.Tensor) -> None:
        with surgery.context(model).use(0):
            logits = model(input_ids=rows).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), rows.flatten()).backward()

    fns = {"fused_step": fused_step, "solo_steps": solo_steps,
           "one_pass16": lambda: pass_over(ids),
           "four_pass4": lambda: [pass_over(ids[i : i + 4]) for i in range(0, 16, 4)]}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):  # the first round warms up
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv: list[str]) -> int:
    mode, data, out = argv[0], Path(argv[1]), Path(argv[2])
    torch.set_num_threads(int(argv[4]) if len(argv) > 4 else torch.get_num_threads())
    if mode == "fused":
        result = _fused(data, out)
    elif mode == "solo":
        result = _solo(data, out, int(argv[3]))
    elif mode == "peft":
        result = _peft(data, out)
    elif mode == "inprocess":
        result = _inprocess(data, out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    result["peak_rss"] = _status_kib("VmHWM") * 1024
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

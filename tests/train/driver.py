"""A training run on a tiny model, as a separate process that the tests can kill.

python -m tests.train.driver OUT_DIR [--resume] [--kill-after N] [--kill-in-checkpoint N]
    [--nan-at N] [--steps N] [--batch N] [--accum N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
from pathlib import Path

import torch

from loratree.models.tiny import tiny_llama, tiny_tokenizer
from loratree.train import TrainConfig, distributed, fit, save, setup
from loratree.train import checkpoint as ckpt


def write_data(folder: Path, n: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """A copy task in words: "w5 w9 w12" -> "w12 w9 w5" (reversed)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, count in (("train", n), ("eval", 8)):
        rows = []
        for _ in range(count):
            words = [f"w{rng.randint(3, 60)}" for _ in range(rng.randint(2, 6))]
            rows.append({"prompt": " ".join(words), "completion": " ".join(reversed(words))})
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--kill-in-checkpoint", type=int, default=0)
    p.add_argument("--term-after", type=int, default=0)
    p.add_argument("--nan-at", type=int, default=0)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.1)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    train_path, eval_path = write_data(out.parent / "data")
    config = TrainConfig(
        data=str(train_path),
        eval_data=str(eval_path),
        out=str(out),
        rank=4,
        alpha=8,
        dropout=args.dropout,
        targets=("all-linear",),
        batch_size=args.batch,
        grad_accum=args.accum,
        max_steps=args.steps,
        warmup_steps=2,
        lr=5e-3,
        save_every=3,
        eval_every=6,
        keep_last=2,
        eval_examples=0,
        max_length=32,
    )
    model = tiny_llama(vocab=64)
    if args.nan_at:
        calls = {"n": 0}

        def poison(module, inputs, output):
            calls["n"] += 1
            if calls["n"] == args.nan_at:
                output.logits.fill_(float("nan"))

        model.register_forward_hook(poison)
    if args.kill_in_checkpoint:
        real = ckpt.save_file

        def dying_save(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            if f"{args.kill_in_checkpoint:08d}" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt.save_file = dying_save

    def on_step(step: int, loss: float) -> None:
        if step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_after:  # as a scheduler's SIGTERM arriving mid-step would
            os.kill(os.getpid(), signal.SIGTERM)

    run = setup(config, model=model, tokenizer=tiny_tokenizer(64))
    try:
        result = fit(run, resume=args.resume, progress=False, on_step=on_step)
        if not result.interrupted:
            save(run)
        print(json.dumps({"steps": result.steps, "interrupted": result.interrupted}))
    finally:
        distributed.shutdown(run.dist)


if __name__ == "__main__":
    main()

"""The benchmark rows: forward overhead, merged forward, merge / switch time, file size.

Every group builds its own deep copies of the base model, so the groups are independent
and the memory of one is freed before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from torch import nn

from bench.contenders import (
    ALL_R16,
    QV_R8,
    add_ours_slot,
    add_peft_adapter,
    ours_model,
    peft_model,
)
from bench.harness import Timing, forward_fn, interleaved, paired_ratio
from bench.report import Check, Row, Table, fmt
from loratree import surgery
from loratree.adapters import save_adapter

__all__ = ["file_tables", "forward_tables", "merge_tables"]

log = logging.getLogger(__name__)

MERGED_TOLERANCE = 0.03
"""Acceptance: merged forward time within 1.00 ± 0.03 of the base forward."""
PARITY_TOLERANCE = 1e-3
"""Max |logits| difference, relative to max |logits|, beyond which the sides differ."""


def forward_tables(
    base: nn.Module, ids: torch.Tensor, repeats: int
) -> tuple[list[Table], list[Check]]:
    """Rows a-c: unmerged forward for two adapters, and merged forward, all against the base."""
    ours = {s.label: ours_model(base, s, seed=i + 1) for i, s in enumerate((QV_R8, ALL_R16))}
    theirs = {s.label: peft_model(base, s, ours[s.label]) for s in (QV_R8, ALL_R16)}
    ours["merged"] = ours_model(base, ALL_R16, seed=2)
    theirs["merged"] = peft_model(base, ALL_R16, ours["merged"])
    surgery.merge(ours["merged"], 0)
    theirs["merged"].merge_adapter()

    probe = ids[:1, :16]
    notes = {
        s.label: [_parity(base, ours[s.label], theirs[s.label], probe)] for s in (QV_R8, ALL_R16)
    }
    notes["merged"] = [
        _parity(base, ours["merged"], theirs["merged"], probe, "ours vs PEFT, both merged")
    ]

    fns: dict[str, Callable[[], object]] = {"base": forward_fn(base, ids)}
    for label in ours:
        fns[f"ours {label}"] = forward_fn(ours[label], ids)
        fns[f"PEFT {label}"] = forward_fn(theirs[label], ids)
    log.info("forward: %d contenders x %d interleaved rounds", len(fns), repeats)
    t = interleaved(fns, repeats, warmup=1)
    for name, timing in t.items():
        log.info("  %-22s %s", name, timing.describe())

    shape = f"batch {ids.shape[0]} x {ids.shape[1]} tokens"
    base_note = f"Base forward, no adapter: {t['base'].describe()}."
    tables, checks = [], []
    for spec in (QV_R8, ALL_R16):
        table, check = _unmerged(t, spec.label, [base_note, *notes[spec.label]])
        tables.append(Table(f"Unmerged forward, {spec.label} ({shape})", table.rows, table.notes))
        checks.append(check)
    mine, peer = t["ours merged"].median, t["PEFT merged"].median
    base_t = t["base"].median
    rows = [
        Row("merged forward", mine, peer, "ms"),
        Row("merged / base", mine / base_t, peer / base_t, "ratio"),
        Row("merged / base, paired", *_paired(t, "merged"), "ratio"),
    ]
    title = f"Merged forward, {ALL_R16.label} ({shape})"
    tables.append(Table(title, rows, [base_note, *notes["merged"]]))
    checks.append(
        Check(
            f"merged forward / base = 1.00 ± {MERGED_TOLERANCE:.2f}",
            fmt(mine / base_t, "ratio"),
            abs(mine / base_t - 1) <= MERGED_TOLERANCE,
        )
    )
    return tables, checks


def _unmerged(t: dict[str, Timing], label: str, notes: list[str]) -> tuple[Table, Check]:
    base_t = t["base"].median
    mine, peer = t[f"ours {label}"].median, t[f"PEFT {label}"].median
    over, peer_over = mine / base_t - 1, peer / base_t - 1
    paired = [r - 1 for r in _paired(t, label)]
    rows = [
        Row("forward", mine, peer, "ms"),
        Row("overhead over base", over, peer_over, "pct"),
        Row("overhead over base, paired", paired[0], paired[1], "pct"),
    ]
    check = Check(
        f"unmerged overhead, {label}: ours <= PEFT",
        f"ours {fmt(over, 'pct')}, PEFT {fmt(peer_over, 'pct')}",
        over <= peer_over,
    )
    return Table(label, rows, notes), check


def _paired(t: dict[str, Timing], label: str) -> tuple[float, float]:
    """Median per-round ratio to the base, ours and PEFT."""
    base = t["base"]
    return paired_ratio(t[f"ours {label}"], base), paired_ratio(t[f"PEFT {label}"], base)


def merge_tables(base: nn.Module, repeats: int) -> list[Table]:
    """Rows d-e: merge, unmerge, and switch merged X -> merged Y, for all-linear r=16."""
    spec = ALL_R16
    ours = ours_model(base, spec, seed=3)
    add_ours_slot(ours, spec, seed=4)
    theirs = peft_model(base, spec, ours)
    add_peft_adapter(theirs, spec, "second", ours, 1)
    n_layers = len(surgery.lora_layers(ours))

    log.info("merge / unmerge: %d layers x %d rounds", n_layers, repeats)
    cycle = {
        "ours merge": lambda: surgery.merge(ours, 0),
        "PEFT merge": theirs.merge_adapter,
        "ours unmerge": lambda: surgery.unmerge(ours),
        "PEFT unmerge": theirs.unmerge_adapter,
    }
    t = interleaved(cycle, repeats, warmup=1, rotate=False)

    surgery.merge(ours, 0)
    theirs.merge_adapter()
    log.info("switch: %d rounds", repeats)
    names = ("default", "second")

    def peft_switch(slot: int) -> None:
        theirs.unmerge_adapter()
        theirs.set_adapter(names[slot])
        theirs.merge_adapter()

    s = interleaved(
        {"ours": _toggle(lambda k: surgery.switch(ours, k)), "PEFT": _toggle(peft_switch)},
        repeats,
        warmup=1,
    )
    diff = _weight_gap(ours, theirs)
    return [
        Table(
            f"Merge, unmerge and switch, {spec.label} ({n_layers} layers)",
            [
                Row("merge", t["ours merge"].median, t["PEFT merge"].median, "ms"),
                Row("unmerge", t["ours unmerge"].median, t["PEFT unmerge"].median, "ms"),
                Row("switch merged X -> merged Y", s["ours"].median, s["PEFT"].median, "ms"),
            ],
            [
                "PEFT switch = unmerge_adapter + set_adapter + merge_adapter; "
                "ours = surgery.switch (W += dW_Y - dW_X).",
                f"Max |W_ours - W_PEFT| after the switches: {diff:.2e}.",
                f"Rounds redone because other processes were busy: merge / unmerge "
                f"{t['ours merge'].redone}, switch {s['ours'].redone}.",
            ],
        )
    ]


def file_tables(base: nn.Module, tmp: Path) -> list[Table]:
    """Row f: adapter weight file size, ours and PEFT, against the model's size."""
    params = {id(p): p for p in base.parameters()}.values()
    n_params = sum(p.numel() for p in params)
    fp32, bf16 = 4 * n_params, 2 * n_params
    rows = []
    for i, spec in enumerate((QV_R8, ALL_R16)):
        ours = ours_model(base, spec, seed=10 + i)
        theirs = peft_model(base, spec, ours)
        mine_dir = save_adapter(ours, tmp / f"ours-{i}", slot=0)
        theirs.save_pretrained(tmp / f"peft-{i}")
        mine = _weights_bytes(Path(mine_dir))
        peer = _weights_bytes(tmp / f"peft-{i}")
        rows.append(Row(f"adapter weights file, {spec.label}", mine, peer, "bytes"))
        rows.append(
            Row(f"share of the fp32 model, {spec.label}", mine / fp32, peer / fp32, "share")
        )
    return [
        Table(
            "Adapter file size",
            rows,
            [
                f"Base model: {n_params:,} parameters = {fmt(fp32, 'bytes')} in float32, "
                f"{fmt(bf16, 'bytes')} in bfloat16.",
                "Size of adapter_model.safetensors as written (float32 weights).",
            ],
        )
    ]


def _toggle(step: Callable[[int], None]) -> Callable[[], None]:
    """A callable that alternates ``step(1)``, ``step(0)``, ``step(1)``, ..."""
    state = [0]

    def run() -> None:
        state[0] ^= 1
        step(state[0])

    return run


def _parity(
    base: nn.Module, a: nn.Module, b: nn.Module, ids: torch.Tensor, what: str = "ours vs PEFT"
) -> str:
    """Check that two adapted models agree and that the adapter changes the base output."""
    with torch.inference_mode():
        y0 = base(input_ids=ids, use_cache=False).logits
        ya = a(input_ids=ids, use_cache=False).logits
        yb = b(input_ids=ids, use_cache=False).logits
    gap, effect, scale = (
        (ya - yb).abs().max().item(),
        (ya - y0).abs().max().item(),
        y0.abs().max().item(),
    )
    if gap > PARITY_TOLERANCE * scale:
        raise RuntimeError(f"{what}: logits differ by {gap:.3e} (max |logit| {scale:.1f})")
    return (
        f"Parity, {what}: max |logits gap| {gap:.1e}; the adapter moves logits up to {effect:.2f}."
    )


def _weight_gap(ours: nn.Module, theirs: peft.PeftModel) -> float:
    gap = 0.0
    for name, layer in surgery.lora_layers(ours).items():
        peer = theirs.get_submodule(f"base_model.model.{name}").base_layer.weight
        gap = max(gap, (layer.base.weight - peer).abs().max().item())
    return gap


def _weights_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size

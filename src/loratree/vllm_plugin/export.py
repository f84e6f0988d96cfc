"""A store exported for vLLM: one flat directory, one plain PEFT LoRA adapter per name.

vLLM's filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR``), ``--lora-modules`` and Ray
Serve LLM's ``dynamic_lora_loading_path`` all read a directory whose children are adapter
directories, one level deep. So every LoRA adapter of the store is written there composed
(a tree node as its whole path, as ``loratree tree export`` does) under its name with
``/`` spelled ``--`` (``support/fr`` -> ``support--fr``), and what vLLM cannot serve
(prefix adapters, stale nodes, damaged entries, DoRA ...) is skipped with a warning and
listed. Beside the adapters:

- ``loratree-export.json``: each exported name's store name, rank and content hash, the
  skipped names with the reason, and the ``--max-lora-rank`` vLLM needs;
- ``vllm-args.txt``: ``vllm serve`` arguments, one per line: ``--enable-lora``,
  ``--max-lora-rank R`` and ``--lora-modules NAME=PATH ...``.

vLLM's filesystem resolver serves an adapter only when its ``base_model_name_or_path``
equals the model given to ``vllm serve``, so ``base_model`` rewrites that field.
The directory is replaced whole (``fsio.atomic_dir``): a reader sees the old export or the
new one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from loratree.adapters import AdapterStore
from loratree.adapters.files import write_adapter_file
from loratree.fsio import atomic_dir
from loratree.tree import nodes
from loratree.vllm_plugin.servable import RefusedError, adapter_rank, for_vllm, vllm_max_lora_rank

__all__ = ["ARGS_NAME", "EXPORT_MANIFEST", "SEPARATOR", "ExportReport", "export_store",
           "flat_name"]

log = logging.getLogger(__name__)

SEPARATOR = "--"
"""What a tree path's ``/`` becomes in an exported name (one directory level)."""
EXPORT_MANIFEST = "loratree-export.json"
ARGS_NAME = "vllm-args.txt"


def flat_name(name: str) -> str:
    """The exported name of a store name: ``support/fr`` -> ``support--fr``."""
    return name.replace("/", SEPARATOR)


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and what it skipped."""

    out: Path
    names: dict[str, str] = field(default_factory=dict)
    """Exported name -> store name."""
    ranks: dict[str, int] = field(default_factory=dict)
    """Exported name -> its largest rank."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Store name -> why vLLM cannot serve it."""

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=1)

    @property
    def max_lora_rank(self) -> int:
        """The ``--max-lora-rank`` vLLM needs for every exported adapter."""
        return vllm_max_lora_rank(self.max_rank)

    def lora_modules(self) -> list[str]:
        """``NAME=PATH`` for each exported adapter (``--lora-modules`` takes them)."""
        return [f"{n}={self.out / n}" for n in sorted(self.names)]

    def vllm_args(self) -> list[str]:
        modules = self.lora_modules()
        return ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                *(["--lora-modules", *modules] if modules else [])]


def export_store(store: AdapterStore, out: str | Path, *,
                 base_model: str | None = None) -> ExportReport:
    """Write every adapter of ``store`` that vLLM can serve into ``out`` (replaced whole).

    Raises:
        ValueError: two store names flatten to the same exported name, or ``out`` exists
            and is not an earlier export (it is never overwritten then).
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / EXPORT_MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a loratree export; choose an empty or "
                         "new directory")
    good, bad = store.scan()
    seen: dict[str, str] = {}
    for info in good:
        flat = flat_name(info.name)
        if flat in seen:
            raise ValueError(f"store names {seen[flat]!r} and {info.name!r} both export as "
                             f"{flat!r}; rename one of them")
        seen[flat] = info.name
    names, ranks = {}, {}
    skipped = {d.name: f"damaged: {d.problem}" for d in bad}
    with atomic_dir(out) as tmp:
        for info in good:
            try:
                adapter = for_vllm(store, info.name)
            except RefusedError as e:
                skipped[info.name] = str(e)
                continue
            if base_model is not None:
                raw = {**adapter.raw_config, "base_model_name_or_path": base_model}
                adapter = dataclasses.replace(adapter, raw_config=raw)
            flat = flat_name(info.name)
            write_adapter_file(adapter, tmp / flat)
            names[flat], ranks[flat] = info.name, adapter_rank(adapter)
        report = ExportReport(out, names, ranks, skipped)
        _write_manifest(tmp, store, report, base_model)
    for name, why in sorted(skipped.items()):
        log.warning("export for vLLM: skipped %r: %s", name, why)
    return report


def _write_manifest(tmp: Path, store: AdapterStore, report: ExportReport,
                    base_model: str | None) -> None:
    adapters = {flat: {"store_name": name, "rank": report.ranks[flat],
                       "content": nodes.path_hash(store, name)}
                for flat, name in sorted(report.names.items())}
    manifest = {"format": 1, "store": str(store.root), "base_model": base_model,
                "max_lora_rank": report.max_lora_rank, "adapters": adapters,
                "skipped": dict(sorted(report.skipped.items()))}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (tmp / ARGS_NAME).write_text("\n".join(report.vllm_args()) + "\n")

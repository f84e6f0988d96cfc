"""``loratree export --for vllm STORE DIR``: a store as a directory another engine serves.

The export is a snapshot: adding or replacing adapters in the store later does not change
it (export again). ``--for`` names the engine; vLLM is the one so far.
"""

from __future__ import annotations

import argparse
import shlex
from enum import StrEnum

from loratree.adapters import AdapterStore
from loratree.vllm_plugin import export_store
from loratree.vllm_plugin.export import ARGS_NAME, EXPORT_MANIFEST

__all__ = ["ExportTarget", "add_parser", "run"]


class ExportTarget(StrEnum):
    """The engines a store can be exported for."""

    VLLM = "vllm"
    """A flat directory of PEFT LoRA adapters: vLLM's filesystem resolver,
    ``--lora-modules``, and Ray Serve LLM's ``dynamic_lora_loading_path``."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a store's adapters as a directory another "
                                      "engine serves (vLLM: tree nodes composed, prefix "
                                      "adapters skipped)")
    p.add_argument("--for", dest="target", required=True, type=ExportTarget,
                   choices=list(ExportTarget), help="the engine to export for")
    p.add_argument("store", help="the store directory")
    p.add_argument("out", help="the directory to write (replaced whole if it is an earlier "
                               "export)")
    p.add_argument("--base-model", default=None,
                   help="write this as every adapter's base_model_name_or_path; vLLM's "
                        "filesystem resolver serves an adapter only when it equals the "
                        "MODEL given to `vllm serve`")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    store = AdapterStore(args.store)
    report = export_store(store, args.out, base_model=args.base_model)
    print(f"exported {len(report.names)} adapter(s) to {report.out} (largest rank "
          f"{report.max_rank}: vLLM needs --max-lora-rank {report.max_lora_rank})")
    for name, why in sorted(report.skipped.items()):
        print(f"skipped {name}: {why}")
    print(f"{EXPORT_MANIFEST} lists them; {ARGS_NAME} holds the `vllm serve` arguments:")
    print(f"  vllm serve MODEL $(cat {shlex.quote(str(report.out / ARGS_NAME))})")
    print(f"  VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 "
          f"VLLM_LORA_RESOLVER_CACHE_DIR={shlex.quote(str(report.out))} "
          f"vllm serve MODEL --enable-lora --max-lora-rank {report.max_lora_rank}")
    if args.base_model is None:
        print("note: without --base-model the adapters keep their recorded base model name; "
              "vLLM's filesystem resolver matches it against `vllm serve MODEL` literally")
    return 0

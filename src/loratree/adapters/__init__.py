"""Adapter files (PEFT format, LoRA and prefix-tuning, with the routing.json and tree.json
beside them) and the named store."""

from loratree.adapters.files import (
    AdapterFile,
    check_adapter_dir,
    load_adapter,
    read_adapter,
    save_adapter,
)
from loratree.adapters.store import AdapterInfo, AdapterStore, check_name

__all__ = [
    "AdapterFile",
    "AdapterInfo",
    "AdapterStore",
    "check_adapter_dir",
    "check_name",
    "load_adapter",
    "read_adapter",
    "save_adapter",
]

"""Adapter files (PEFT format, LoRA and prefix-tuning), the named store and the RAM cache."""

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

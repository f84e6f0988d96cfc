"""Adapter files (PEFT format), and later the adapter store and cache."""

from loratree.adapters.files import AdapterFile, load_adapter, read_adapter, save_adapter

__all__ = ["AdapterFile", "load_adapter", "read_adapter", "save_adapter"]

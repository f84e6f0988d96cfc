"""Model surgery: find targets, inject LoRA layers, freeze, merge, switch, unload."""

from loratree.surgery.inject import (
    InjectionReport,
    adapter_parameters,
    context,
    inject,
    lora_layers,
    set_trainable,
)
from loratree.surgery.merge import merge, merge_and_unload, switch, unload, unmerge
from loratree.surgery.targets import adaptable_modules, find_targets

__all__ = [
    "InjectionReport",
    "adaptable_modules",
    "adapter_parameters",
    "context",
    "find_targets",
    "inject",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "set_trainable",
    "switch",
    "unload",
    "unmerge",
]

"""Model surgery: find targets, inject LoRA layers, freeze, grow, merge, switch, unload."""

from loratree.surgery.copies import copy_layers, saved_modules, wrap_copy
from loratree.surgery.features import pooled_features, prompt_features
from loratree.surgery.grow import GrowReport, grow_slot
from loratree.surgery.inject import (
    InjectionReport,
    adapter_parameters,
    context,
    inject,
    lora_layers,
    reserve_slots,
    set_trainable,
    stack,
)
from loratree.surgery.merge import merge, merge_and_unload, switch, unload, unmerge
from loratree.surgery.plan import DEFAULT_RANKS, STANDARD_TARGETS, PlanRow, adapter_size, rank_plane
from loratree.surgery.prefix import (
    add_prefix,
    clear_prefix,
    geometry,
    prefix_bank,
    remove_prefixes,
    set_prefix,
    slot_count,
)
from loratree.surgery.quantize import (
    MergeErrorReport,
    QuantizeReport,
    export_merged,
    nf4_layers,
    quantize,
)
from loratree.surgery.targets import adaptable_modules, find_targets
from loratree.surgery.tokens import (
    input_embedding_name,
    token_layers,
    token_modules,
    wrap_tokens,
)

__all__ = [
    "DEFAULT_RANKS",
    "STANDARD_TARGETS",
    "GrowReport",
    "InjectionReport",
    "MergeErrorReport",
    "PlanRow",
    "QuantizeReport",
    "adaptable_modules",
    "adapter_parameters",
    "adapter_size",
    "add_prefix",
    "clear_prefix",
    "context",
    "copy_layers",
    "export_merged",
    "find_targets",
    "geometry",
    "grow_slot",
    "inject",
    "input_embedding_name",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "nf4_layers",
    "pooled_features",
    "prefix_bank",
    "prompt_features",
    "quantize",
    "rank_plane",
    "remove_prefixes",
    "reserve_slots",
    "saved_modules",
    "set_prefix",
    "set_trainable",
    "slot_count",
    "stack",
    "switch",
    "token_layers",
    "token_modules",
    "unload",
    "unmerge",
    "wrap_copy",
    "wrap_tokens",
]

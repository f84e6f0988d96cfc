"""What of a store vLLM can serve, as one plain LoRA adapter per name.

vLLM loads PEFT LoRA directories: no prefix adapters, no DoRA, no LoRA bias, no full
module copies, no trainable token rows. A tree node is handed over composed (its whole
path as one LoRA of the summed rank, ``tree.compose_files``), so vLLM never needs to know
about trees. Everything vLLM cannot serve is refused here, by name and with the reason,
before vLLM sees a file: its own loader would answer only "could not be loaded".
"""

from __future__ import annotations

from loratree.adapters import AdapterFile, AdapterStore
from loratree.adapters.files import read_adapter
from loratree.errors import AdapterFileError, AdapterNameError, AdapterNotFoundError, TreeError
from loratree.tree import nodes
from loratree.tree.compose import compose_files

__all__ = [
    "VLLM_MAX_LORA_RANKS",
    "DamagedEntryError",
    "NotLoraError",
    "RefusedError",
    "StaleNodeError",
    "UnsupportedFeatureError",
    "adapter_rank",
    "check_servable",
    "compose_for_vllm",
    "for_vllm",
    "unsupported",
    "vllm_max_lora_rank",
]

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM 0.32 accepts for ``--max-lora-rank`` (its ``MaxLoRARanks``)."""


class RefusedError(ValueError):
    """The store holds the adapter, but it must not be handed to vLLM; the message says why
    and what to do instead."""


class NotLoraError(RefusedError):
    """A prefix adapter: vLLM serves LoRA adapters only."""


class StaleNodeError(RefusedError):
    """A tree node whose parent path changed after it was trained (``tree.nodes.stale``)."""


class DamagedEntryError(RefusedError):
    """The store entry (or its materialised copy) cannot be read as it was written."""


class UnsupportedFeatureError(RefusedError):
    """A LoRA adapter that uses something vLLM does not load (DoRA, LoRA bias, ...)."""


def for_vllm(store: AdapterStore, name: str) -> AdapterFile:
    """``name`` as the one plain LoRA adapter vLLM should load (a node composed).

    Raises:
        AdapterNotFoundError, AdapterNameError: no such adapter (not ours to answer).
        RefusedError: the adapter exists but vLLM must not serve it (the subclass says why).
    """
    check_servable(store, name)
    return compose_for_vllm(store, name)


def check_servable(store: AdapterStore, name: str) -> None:
    """Refuse what the store's current state says vLLM must not serve: a damaged entry, a
    prefix adapter, a stale node. Reads configs and tree records, not weights.

    Raises:
        AdapterNotFoundError, AdapterNameError: no such adapter (not ours to answer).
        RefusedError: the subclass says why.
    """
    try:
        info = store.info(name)
    except (AdapterNotFoundError, AdapterNameError):
        raise
    except (AdapterFileError, TreeError) as e:
        raise DamagedEntryError(f"adapter {name!r} is damaged in the store ({e}); replace "
                                f"it with `loratree store add {name} DIR`") from e
    if info.kind != "lora":
        raise NotLoraError(f"adapter {name!r} is a {info.kind} adapter; vLLM serves LoRA "
                           "adapters only. Serve it with `loratree serve`, which runs prefix "
                           "and LoRA adapters in one batch")
    try:
        is_stale = nodes.stale(store, name)
    except (OSError, AdapterFileError, TreeError, AdapterNotFoundError) as e:
        raise DamagedEntryError(f"adapter {name!r}: its tree path cannot be read ({e})") from e
    if is_stale:
        raise StaleNodeError(f"tree node {name!r} is stale: its parent path changed after it "
                             f"was trained. Retrain it, or `loratree tree accept {name}`")


def compose_for_vllm(store: AdapterStore, name: str) -> AdapterFile:
    """Read ``name``'s path and compose it into one LoRA adapter vLLM loads.

    Raises:
        DamagedEntryError: a file on the path cannot be read or the path does not compose.
        UnsupportedFeatureError: the adapter uses something vLLM does not load.
    """
    try:
        files = [read_adapter(version) for _, version, _ in nodes.lineage(store, name)]
        adapter = compose_files(files, name)
    except (OSError, AdapterFileError, TreeError, AdapterNotFoundError) as e:
        raise DamagedEntryError(f"adapter {name!r}: its tree path cannot be composed ({e})"
                                ) from e
    problems = unsupported(adapter)
    if problems:
        raise UnsupportedFeatureError(f"adapter {name!r} uses {', '.join(problems)}, which "
                                      "vLLM does not load; serve it with `loratree serve`")
    return adapter


def unsupported(adapter: AdapterFile) -> list[str]:
    """What in ``adapter`` vLLM would refuse or drop, in words (empty: vLLM serves it)."""
    c = adapter.config
    found = []
    if c.use_dora or adapter.magnitudes:
        found.append("DoRA")
    if c.lora_bias or adapter.biases:
        found.append("LoRA bias")
    if c.modules_to_save or adapter.copies:
        found.append("modules_to_save (full module copies)")
    if c.trainable_token_indices or adapter.tokens:
        found.append("trainable token rows")
    if c.target_parameters or adapter.params or adapter.pending:
        found.append("target_parameters")
    return found


def adapter_rank(adapter: AdapterFile) -> int:
    """The largest rank over the adapter's modules (what ``--max-lora-rank`` must cover)."""
    return max((a.shape[0] for a, _ in adapter.weights.values()), default=0)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that covers ``rank``.

    Raises:
        ValueError: ``rank`` is above vLLM's largest choice.
    """
    for choice in VLLM_MAX_LORA_RANKS:
        if choice >= rank:
            return choice
    raise ValueError(f"rank {rank} is above vLLM's largest --max-lora-rank "
                     f"({VLLM_MAX_LORA_RANKS[-1]})")

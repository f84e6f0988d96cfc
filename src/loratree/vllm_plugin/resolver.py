"""The vLLM side of the plugin: a ``LoRAResolver`` over a loratree store.

This is the only module of loratree that imports vLLM, and nothing in loratree imports
it: vLLM loads it through the ``vllm.general_plugins`` entry point (``register``), in the
API server process where requests name their adapter. The resolution itself (compose,
materialise, check, refuse) is ``MaterialisedCache``, which runs without vLLM.

vLLM asks a resolver only for a ``model`` it does not know yet, and remembers the answer
for the life of the process; replacing an adapter in the store is seen after
``POST /v1/unload_lora_adapter`` for that name (the next request resolves it again, and
a new content version gets a new cache entry).
"""

from __future__ import annotations

import asyncio
import logging

from vllm.exceptions import VLLMUnprocessableEntityError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loratree.errors import AdapterNameError, AdapterNotFoundError
from loratree.vllm_plugin.cache import MaterialisedCache
from loratree.vllm_plugin.servable import RefusedError

__all__ = ["RESOLVER_NAME", "StoreResolver", "register_resolver"]

log = logging.getLogger(__name__)

RESOLVER_NAME = "loratree store"


class StoreResolver(LoRAResolver):
    """Resolves ``model`` = a store name or tree path to a materialised PEFT directory."""

    def __init__(self, cache: MaterialisedCache) -> None:
        self.cache = cache

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """None for a name the store does not hold (vLLM answers 404, or asks its next
        resolver); a refusal is vLLM's 422 error with loratree's reason as the message."""
        try:
            entry = await asyncio.to_thread(self.cache.get, lora_name)
        except (AdapterNotFoundError, AdapterNameError):
            return None
        except RefusedError as e:
            log.warning("loratree store: refused %r: %s", lora_name, e)
            raise VLLMUnprocessableEntityError(str(e), parameter="model") from e
        # vLLM replaces the id with its own counter; it must only be positive here.
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(entry.path))


def register_resolver(cache: MaterialisedCache) -> None:
    """Put a ``StoreResolver`` over ``cache`` into vLLM's resolver registry."""
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, StoreResolver(cache))

"""What a Ray Serve application of loratree replicas is made of (plain data, no Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loratree.serve.cpu import CpuTuning
from loratree.serve.http import ServerConfig

__all__ = ["RayServeOptions"]


@dataclass(frozen=True)
class RayServeOptions:
    """N loratree engine replicas behind one OpenAI API, routed by adapter name.

    Every replica builds its own engine (base model, RAM cache, slots) over the same store
    directory and plain adapter folders, which every node of the cluster must see at the
    same paths.
    """

    store: str | None = None
    """The adapter store directory."""
    adapters_dirs: tuple[str, ...] = ()
    """Folders of plain PEFT adapter directories served read-only beside the store, as
    ``loratree serve --adapters-dir`` serves them (the store wins a name both hold)."""
    model: str | None = None
    """Base model: an HF directory, a .gguf file, or None for the embedded default."""
    model_factory: str | None = None
    """Instead of ``model``: ``"package.module:function"``, a function of no arguments that
    returns ``(model, tokenizer)``; every replica imports and calls it (tests build tiny
    models this way)."""
    replicas: int = 2
    cache_mb: float = 512.0
    """Each replica's adapter cache budget; it also sets how many adapters a replica
    reports as held to Ray's router (``LoraTreeReplica``)."""
    slots: int = 4
    max_rank: int = 64
    max_batch: int = 8
    cpu_tuning: CpuTuning | None = field(default_factory=CpuTuning)
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each replica (its torch threads follow it)."""
    max_ongoing_requests: int | None = None
    """Requests one replica takes at once (None: ``2 * max_batch``, a running batch and a
    waiting one); Ray's router sends a request for an adapter that only full replicas hold
    to another replica, which then loads it."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """The OpenAI layer's settings, the same for every replica."""
    name: str = "loratree"
    """The Serve application's name."""

    def __post_init__(self) -> None:
        issues = []
        if self.store is None and not self.adapters_dirs:
            issues.append("nothing to serve: give a store, adapters_dirs, or both")
        if isinstance(self.adapters_dirs, str):
            issues.append("adapters_dirs must be a tuple of folders, not one string")
        if self.model is not None and self.model_factory is not None:
            issues.append("give model or model_factory, not both")
        if self.model_factory is not None and ":" not in self.model_factory:
            issues.append(f"model_factory must be 'module:function', got "
                          f"{self.model_factory!r}")
        for name in ("replicas", "slots", "max_rank", "max_batch", "max_ongoing_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                issues.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.cache_mb <= 0:
            issues.append(f"cache_mb must be positive, got {self.cache_mb}")
        if self.replica_cpus < 0:
            issues.append(f"replica_cpus must be >= 0, got {self.replica_cpus}")
        if issues:
            raise ValueError("; ".join(issues))

    @property
    def ongoing(self) -> int:
        """``max_ongoing_requests`` as Ray gets it."""
        return self.max_ongoing_requests or 2 * self.max_batch

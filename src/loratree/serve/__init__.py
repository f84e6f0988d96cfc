"""Serving: a batched generation engine over the slot table (and, above it, HTTP)."""

from loratree.serve.engine import Completion, Engine, Handle, Request

__all__ = ["Completion", "Engine", "Handle", "Request"]

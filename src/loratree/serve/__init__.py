"""Serving: a batched generation engine over the slot table (and, above it, HTTP)."""

from loratree.serve.engine import Engine
from loratree.serve.requests import AUTO, Completion, FinishReason, Handle, Request

__all__ = ["AUTO", "Completion", "Engine", "FinishReason", "Handle", "Request"]

"""Serving: a batched generation engine over the slot table (and, above it, HTTP)."""

from loratree.serve.engine import Engine
from loratree.serve.requests import AUTO, Completion, FinishReason, Handle, Request
from loratree.serve.router import Route, Router
from loratree.serve.slot_table import BASE, SlotTable

__all__ = [
    "AUTO",
    "BASE",
    "Completion",
    "Engine",
    "FinishReason",
    "Handle",
    "Request",
    "Route",
    "Router",
    "SlotTable",
]

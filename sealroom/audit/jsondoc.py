"""Reading JSON documents the reader did not write (receipts, logs, records of processing): a
missing or malformed part reads as absent, never as an exception in a renderer or a listing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["at_path", "listed"]


def at_path(doc: Any, *path: str) -> Any:
    """``doc[path[0]][path[1]]...``, or None where a step is missing or not an object."""
    for key in path:
        doc = doc.get(key) if isinstance(doc, Mapping) else None
    return doc


def listed(doc: Any) -> list[Any]:
    """``doc`` if it is a list, else an empty list."""
    return doc if isinstance(doc, list) else []

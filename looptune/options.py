"""Declaring a configurable option: its default, its comment in config.yaml, its bounds.

The daemon's config sections and every tuner plugin's `Options` dataclass use the same two
helpers, so `looptune config check` validates a plugin's `tuners.<name>` section like any other
(key, value and what is allowed) and `config show --defaults` documents it. Pure Python.
"""
from __future__ import annotations

from dataclasses import field
from typing import Any, Callable


def opt(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
        choices: tuple[str, ...] | None = None,
        check: Callable[[Any], str | None] | None = None) -> Any:
    """A config field: its default, the comment written to config.yaml, and its bounds."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc})

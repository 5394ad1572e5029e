"""Plug-in registries: a name maps to "module:attribute", imported only when chosen.

The tables live beside what they register (`BACKBONES` in models/backbone.py, `METHODS` in
models/methods.py); a plug-in is one module plus one line there. Nothing is imported until
a recipe names it, so a registry never imports its plug-ins and there is no import cycle.
"""
from __future__ import annotations

import importlib
from typing import Any


def resolve(table: dict[str, str], name: str, key: str) -> Any:
    """The attribute `table[name]` points to; `key` (e.g. "backbone.name") names the recipe
    key in the error."""
    if name not in table:
        raise ValueError(f"{key}: unknown name {name!r}; known: {sorted(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)

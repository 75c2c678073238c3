"""Names resolved on first use: "package.module:attr" -> that attribute.

Registries use this for entries that live in a higher layer (the toy world registers scorers, Syn-Pic
generators and a prompt source this way), so a lower layer can list them without importing them. The
strings are written in diffalign's own code, never read from a config file.
"""

from __future__ import annotations

import importlib
from typing import Any


def load_attr(target: str) -> Any:
    """Import `package.module` and return its `attr`, for a "package.module:attr" string."""
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{target!r} is not of the form package.module:attr")
    return getattr(importlib.import_module(module), attr)

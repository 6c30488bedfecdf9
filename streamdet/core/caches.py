"""Where streamdet keeps its small per-user caches (the CRDS answers, the products'
parsed schemas): ``$XDG_CACHE_HOME/streamdet`` (default ``~/.cache/streamdet``), each
file movable, or switched off, by its own environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def cache_file(variable: str, name: str) -> Path | None:
    """The cache file ``name``, or the path the environment ``variable`` names; None when
    that variable is empty, ``off``, ``0`` or ``no``."""
    chosen = os.environ.get(variable)
    if chosen is not None:
        return None if chosen.strip().lower() in ("", "off", "0", "no") else Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "streamdet" / name

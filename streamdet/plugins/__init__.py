"""The built-in steps, one module a step, each registered through the entry-point group
``streamdet.steps`` exactly like a third-party plugin.

The MIRI chain order (jwst 3.x's Detector1 MIRI branch, restricted to the steps streamdet
ships) lives here and nowhere else: each built-in step declares that it comes ``after``
its predecessor in :data:`MIRI_ORDER`.
"""

from __future__ import annotations

MIRI_ORDER = ("group_scale", "dq_init", "saturation", "firstframe", "lastframe", "reset", "linearity",
              "rscd", "dark_current", "refpix", "jump", "ramp_fit")


def follows(name: str) -> str | None:
    """The step that ``name`` comes after in the MIRI chain (None for the first)."""
    index = MIRI_ORDER.index(name)
    return MIRI_ORDER[index - 1] if index else None

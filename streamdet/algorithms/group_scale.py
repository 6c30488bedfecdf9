"""Rescaling of frame-averaged groups (jwst 3.0 ``group_scale``).

On board, the frames of a group are summed and divided by FRMDIVSR, a power of two;
when that is not NFRAMES (NFRAMES not a power of two) every group is off by
NFRAMES/FRMDIVSR. jwst then multiplies every group of every integration by
FRMDIVSR/NFRAMES, in float32, before anything else (saturation sees the rescaled DN).
With FRMDIVSR absent or equal to NFRAMES nothing changes (jwst: SKIPPED).

Pixeldq contribution: none.
"""

from __future__ import annotations

import numpy as np


def scale_factor(frame_divisor: int | None, nframes: int) -> float | None:
    """FRMDIVSR/NFRAMES when the groups need rescaling, else None (``frame_divisor``
    None, i.e. absent, or equal to ``nframes``). A ValueError when rescaling is needed
    but ``nframes`` is not positive."""
    if frame_divisor is None or frame_divisor == nframes:
        return None
    if nframes <= 0:
        raise ValueError(f"NFRAMES={nframes} (must be positive)")
    return frame_divisor / nframes


def rescale_groups(data: np.ndarray, factor: float) -> None:
    """Multiply ``data`` (float32, any shape) by ``factor`` in place, in float32 as jwst
    multiplies the float32 ramp by a Python float."""
    np.multiply(data, np.float32(factor), out=data)

"""Rescaling of frame-averaged groups (jwst 3.0 ``group_scale``).

On board, the frames of a group are summed and divided by FRMDIVSR, a power of two;
when that is not NFRAMES (NFRAMES not a power of two) every group is off by
NFRAMES/FRMDIVSR. jwst then multiplies every group of every integration by
FRMDIVSR/NFRAMES, in float32, before anything else (saturation sees the rescaled DN).
With FRMDIVSR absent or equal to NFRAMES nothing changes and the step is SKIPPED.

FRMDIVSR must be a positive integer: 0 (jwst would zero the ramp) or anything else is
bad input. Pixeldq contribution: none.
"""

from __future__ import annotations

import numpy as np

from streamdet.core.errors import BadInputError
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Step

from . import follows


def frame_divisor(meta) -> int | None:
    """The exposure's FRMDIVSR, None when absent; a one-line BadInputError naming the
    file when it is not a positive integer."""
    value = meta.header.get("FRMDIVSR")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if isinstance(value, bool) or float(value) != int(float(value)):
            raise ValueError
        divisor = int(float(value))
    except (TypeError, ValueError):
        raise BadInputError(f"{meta.path}: FRMDIVSR={value!r} is not an integer") from None
    if divisor <= 0:
        raise BadInputError(f"{meta.path}: FRMDIVSR={divisor} (the on-board frame divisor "
                            "must be a positive integer)")
    return divisor


def group_scale_factor(meta) -> float | None:
    """FRMDIVSR/NFRAMES when the groups need rescaling, else None."""
    divisor = frame_divisor(meta)
    if divisor is None or divisor == meta.nframes:
        return None
    if meta.nframes <= 0:
        raise BadInputError(f"{meta.path}: NFRAMES={meta.nframes} (must be positive)")
    return divisor / meta.nframes


class GroupScaleStep(Step):
    """Multiplies every group by FRMDIVSR/NFRAMES (jwst 3.0 ``group_scale``)."""

    name = "group_scale"
    after = follows("group_scale")
    status_keyword = "S_GRPSCL"
    thread_safe = True

    def prepare(self, meta, refs, pixeldq):
        scale = group_scale_factor(meta)
        if scale is None:
            return "FRMDIVSR is absent or equal to NFRAMES"
        # jwst multiplies the float32 ramp by a Python float: float32 arithmetic
        self.scale = np.float32(scale)
        return None

    def process(self, chunk):
        np.multiply(chunk.data, self.scale, out=chunk.data)


@hookimpl
def streamdet_steps():
    return [GroupScaleStep]

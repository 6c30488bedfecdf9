"""The ``group_scale`` step: rescales frame-averaged groups by FRMDIVSR/NFRAMES (jwst 3.0
``group_scale``). The algorithm: :mod:`streamdet.algorithms.group_scale`.

FRMDIVSR must be a positive integer: 0 (jwst would zero the ramp) or anything else is
bad input.
"""

from __future__ import annotations

from streamdet.algorithms.group_scale import rescale_groups, scale_factor
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
    """FRMDIVSR/NFRAMES of the exposure when its groups need rescaling, else None."""
    try:
        return scale_factor(frame_divisor(meta), meta.nframes)
    except ValueError as exc:
        raise BadInputError(f"{meta.path}: {exc}") from None


class GroupScaleStep(Step):
    """Multiplies every group by FRMDIVSR/NFRAMES (jwst 3.0 ``group_scale``)."""

    name = "group_scale"
    after = follows("group_scale")
    status_keyword = "S_GRPSCL"
    thread_safe = True
    recomputable = True
    data_only = True  # one factor for every pixel: any columns

    def prepare(self, meta, refs, pixeldq):
        self.factor = group_scale_factor(meta)
        if self.factor is None:
            return "FRMDIVSR is absent or equal to NFRAMES"
        return None

    def process(self, chunk):
        rescale_groups(chunk.data, self.factor)


@hookimpl
def streamdet_steps():
    return [GroupScaleStep]

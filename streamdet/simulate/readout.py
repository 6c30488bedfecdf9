"""MIRI detector geometry and timing: the full frame, the subarray readout windows, their
frame times, and the pixel clock on which EMI is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .params import SimulationError

#: Full MIRI detector array, (rows, columns): 1024 rows of 1032 columns, of which columns
#: 0-3 and 1028-1031 are reference pixels that receive no light.
FULL_SHAPE = (1024, 1032)
#: Width of the reference-column strips at each side of the full frame.
N_REF_COLUMNS = 4

#: Pixel clock of the MIRI focal-plane electronics: 10 microseconds per clock.
_PIXEL_CLOCK_S = 10e-6


@dataclass(frozen=True)
class Subarray:
    """A MIRI imager readout window in detector pixels (FITS 1-based, like SUBSTRT1/2)."""

    name: str
    xstart: int  #: SUBSTRT1: first detector column (1-based)
    ystart: int  #: SUBSTRT2: first detector row (1-based)
    xsize: int  #: SUBSIZE1: number of columns
    ysize: int  #: SUBSIZE2: number of rows
    fast_frame_time: float  #: TFRAME in FASTR1 (s)
    slow_frame_time: float | None = None  #: TFRAME in SLOWR1 (s); None: FAST only

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns) of the readout."""
        return (self.ysize, self.xsize)

    @property
    def full_frame_slices(self) -> tuple[slice, slice]:
        """Where this window sits in a full-frame (1024, 1032) array."""
        y0, x0 = self.ystart - 1, self.xstart - 1
        return (slice(y0, y0 + self.ysize), slice(x0, x0 + self.xsize))

    @property
    def readpatts(self) -> tuple[str, ...]:
        """Read patterns this window can be read out with."""
        return ("FASTR1", "SLOWR1") if self.slow_frame_time else ("FASTR1",)

    def frame_time(self, readpatt: str) -> float:
        """TFRAME (s) for ``readpatt``; raises SimulationError if it is not offered."""
        readpatt = readpatt.upper()
        if readpatt == "FASTR1":
            return self.fast_frame_time
        if readpatt == "SLOWR1" and self.slow_frame_time:
            return self.slow_frame_time
        raise SimulationError(
            f"read pattern {readpatt!r} is not available for subarray {self.name} "
            f"(available: {', '.join(self.readpatts)})"
        )


def _sub(name, xstart, ystart, xsize, ysize, fast_clocks, slow_clocks=None):
    return Subarray(
        name, xstart, ystart, xsize, ysize,
        round(fast_clocks * _PIXEL_CLOCK_S, 8),
        round(slow_clocks * _PIXEL_CLOCK_S, 8) if slow_clocks else None,
    )


# Sources.
# * SUBSTRT/SUBSIZE: the MIRI SIAF aperture definitions (pysiaf
#   source_data/MIRI/miri_siaf_aperture_definition.txt): SUBSTRT = DetRef - SciRef + 1,
#   e.g. MIRIM_SUB64 XDetRef 38.5, XSciRef 38.5 -> SUBSTRT1 1; YDetRef 810.5,
#   YSciRef 32.5 -> SUBSTRT2 779. They agree with the MIRI subarray tables in JDox.
# * Frame times: the frame clock counts ("frameclocks", 10 us each) of jwst 3.0's
#   jwst/emicorr/emicorr.py ``subarray_clocks`` table; FULL FASTR1 277504 clocks =
#   2.77504 s, FULL SLOWR1 2388992 clocks = 23.88992 s. MIRI subarrays are read in
#   FAST mode only.
SUBARRAYS: dict[str, Subarray] = {
    s.name: s
    for s in (
        _sub("FULL", 1, 1, 1032, 1024, 277504, 2388992),
        _sub("BRIGHTSKY", 457, 51, 512, 512, 86528),
        _sub("SUB256", 413, 51, 256, 256, 29952),
        _sub("SUB128", 1, 889, 136, 128, 11904),
        _sub("SUB64", 1, 779, 72, 64, 8512),
        _sub("MASK1065", 1, 19, 288, 224, 23968),
        _sub("MASK1140", 1, 245, 288, 224, 23968),
        _sub("MASK1550", 1, 467, 288, 224, 23968),
        _sub("MASKLYOT", 1, 717, 320, 304, 32400),
        _sub("SLITLESSPRISM", 1, 529, 72, 416, 15904),
    )
}

# EMI clock model. The readout samples the four amplifiers together (columns 4k..4k+3 at
# the same tick), NSAMPLES ticks per column group; a row starts every "row clocks" ticks;
# rows outside a subarray are skipped at 7 ticks each, so a frame of ny rows takes
# ny * rowclocks + (1024 - ny) * 7 ticks -- which is exactly each readout's frame clock
# count above. Row clocks: jwst 3.0 jwst/emicorr/emicorr.py ``subarray_clocks``.
#: One tick of the MIRI pixel clock, s.
EMI_PIXEL_CLOCK_S = _PIXEL_CLOCK_S
#: Ticks from the start of one row to the next, per subarray (FULL: per read pattern).
EMI_ROW_CLOCKS: dict[str, Any] = {
    "FULL": {"FASTR1": 271, "SLOWR1": 2333}, "BRIGHTSKY": 162, "SUB256": 96, "SUB128": 44,
    "SUB64": 28, "MASK1065": 82, "MASK1140": 82, "MASK1550": 82, "MASKLYOT": 90,
    "SLITLESSPRISM": 28,
}
#: Ticks spent on each detector row outside the subarray.
EMI_SKIPPED_ROW_CLOCKS = 7


def emi_read_clocks(subarray: str, readpatt: str, ngroups: int, nsamples: int = 1
                    ) -> tuple[np.ndarray, int, int]:
    """When each pixel is read, in 10 us pixel-clock ticks (the EMI model's time axis).

    Returns ``(spatial, frame, integration)``: ``spatial`` int64 ``[ny, nx]`` ticks from
    the first read of a frame to the read of pixel (y, x), ``y * rowclocks + (x // 4) *
    nsamples``; ``frame`` the ticks between consecutive groups (NFRAMES = 1, GROUPGAP =
    0); ``integration`` the ticks between consecutive integrations: NGROUPS frames plus
    one reset frame. Pixel (y, x) of group g of integration i is read at ``i *
    integration + g * frame + spatial[y, x]`` ticks after the first read of the exposure.
    """
    sub = SUBARRAYS.get(str(subarray).upper())
    rows = EMI_ROW_CLOCKS.get(sub.name) if sub else None
    if isinstance(rows, dict):
        rows = rows.get(str(readpatt).upper())
    if rows is None:
        raise SimulationError(f"no EMI clock model for subarray {subarray!r} read with {readpatt!r}")
    ny, nx = sub.shape
    frame = ny * rows + (FULL_SHAPE[0] - ny) * EMI_SKIPPED_ROW_CLOCKS
    spatial = (np.arange(ny, dtype=np.int64)[:, None] * rows
               + (np.arange(nx, dtype=np.int64)[None, :] // 4) * int(nsamples))
    return spatial, int(frame), int((ngroups + 1) * frame)



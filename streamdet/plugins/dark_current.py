"""Dark-current subtraction with an integration-dependent (4-D) MIRI dark.

Reproduces jwst 3.0 ``dark_current`` (stcal ``dark_sub.do_correction_data`` with a
``DarkMIRIModel``), including its corner cases:

* Which dark integration (see :func:`dark_int_for`): in an unsegmented file, or the first
  segment (INTSTART = 1), science integration ``i`` uses dark integration ``i``, and the
  last dark integration once ``i`` runs past the dark.  In any later segment
  (INTSTART > 1) jwst always uses the last dark integration.
* The dark is subtracted from every group, flagged or saturated ones included; NaN in the
  dark counts as 0.  Float32 minus float32, plane by plane, as in stcal.
* DQ: the group-0 DQ planes of *all* dark integrations are ORed together and into
  ``pixeldq`` (:func:`combined_dark_dq`), whichever dark integration is subtracted.
* Too short a dark (science spans more frames than the dark): jwst extends each dark
  integration by straight-line extrapolation from its last two groups; the extension is
  computed in float64 and the dark then stays float64, so the subtraction is done in
  float64 and rounded to float32 (reproduced here).
* Frame averaging: when NFRAMES or GROUPGAP of science and dark differ, the dark frames
  are averaged (float32 ``mean``) into the science group structure - frames
  ``[start, start+nframes)`` with ``start`` advancing by ``nframes + groupgap``.  jwst
  only averages dark integrations ``< min(dark_nints, file_nints)`` and leaves the others
  zero, which matters for a later segment using the last dark integration
  (:func:`dark_int_for` returns ``None`` then: nothing is subtracted, DQ still ORed).
* If the dark has a larger NFRAMES or GROUPGAP than the science, jwst skips the step
  (data and DQ untouched, status SKIPPED).

Also here: :func:`average_dark_current`, the per-pixel average dark current (e-/s) that
jwst stores on the ramp (``average_dark_current``, AVDRKCUR) for ramp_fit's Poisson
variance - including jwst 3.0's quirk that a 2-D AVDRKCUR array in the dark is ignored
unless the input ramp already had one of the same shape.

Pixeldq contribution: purely from the reference (the combined dark DQ), appliable once
per exposure.  The subtraction is data-side only.
"""

from __future__ import annotations

import math

import numpy as np


def dark_int_for(
    science_int_index: int,
    dark_nints: int,
    *,
    intstart: int = 1,
    file_nints: int | None = None,
    frames_averaged: bool = False,
) -> int | None:
    """Which dark integration jwst subtracts from an absolute science integration.

    ``science_int_index`` is 0-based and absolute; ``intstart`` is the file's 1-based
    INTSTART (1 for unsegmented files).  With ``frames_averaged`` (science NFRAMES or
    GROUPGAP differ from the dark's) and ``file_nints`` given, returns ``None`` when jwst
    would subtract an all-zero averaged dark.
    """
    intstart = 1 if intstart is None else int(intstart)
    if intstart == 1 and science_int_index < dark_nints:
        chosen = int(science_int_index)
    else:
        chosen = int(dark_nints) - 1
    if frames_averaged and file_nints is not None and chosen >= min(dark_nints, file_nints):
        return None
    return chosen


def combined_dark_dq(dark_dq: np.ndarray) -> np.ndarray:
    """OR of the group-0 DQ planes of all dark integrations, as uint32 ``[nrows, nx]``.

    Accepts the full 4-D dark DQ ``[dark_nints, ngroups, nrows, nx]``, just its group-0
    planes ``[dark_nints, nrows, nx]``, or a single 2-D plane.
    """
    dark_dq = np.asarray(dark_dq)
    if dark_dq.ndim == 4:
        dark_dq = dark_dq[:, 0]
    if dark_dq.ndim == 3:
        dark_dq = np.bitwise_or.reduce(dark_dq, axis=0)
    return dark_dq.astype(np.uint32, copy=False)


def total_frames(ngroups: int, nframes: int, groupgap: int) -> int:
    return ngroups * nframes + (ngroups - 1) * groupgap


def subtract_dark(
    data: np.ndarray,
    pixeldq: np.ndarray,
    dark_data: np.ndarray | None,
    dark_pixeldq: np.ndarray | None,
    *,
    nframes: int = 1,
    groupgap: int = 0,
    dark_nframes: int = 1,
    dark_groupgap: int = 0,
    dark_ngroups: int | None = None,
    nan_zeroed: bool = False,
) -> bool:
    """Subtract the dark in place; return False (and change nothing) when jwst skips.

    ``data`` float32 ``[nints, ngroups, nrows, nx]``.  ``dark_data`` holds, for each
    science row of ``data``, the dark integration chosen by :func:`dark_int_for`:
    ``[nints, dark_ngroups, nrows, nx]`` (or a 3-D ``[dark_ngroups, nrows, nx]`` / single
    row used for every integration); ``None`` means jwst's all-zero dark.  It is not
    modified.  ``dark_pixeldq`` is :func:`combined_dark_dq` of the reference, ORed into
    ``pixeldq``.  ``nframes``/``groupgap`` describe the science exposure and
    ``dark_nframes``/``dark_groupgap`` the dark (NFRAMES/GROUPGAP of its header);
    ``dark_ngroups`` defaults to the dark's group axis (jwst uses the array shape too).
    The ``pixeldq`` part is reference-only; pass ``dark_pixeldq=None`` once applied.
    ``nan_zeroed`` says the caller already replaced NaN in ``dark_data`` by 0 (the same
    result for a plain subtraction, so no NaN test is needed); it must not be given when
    the dark is extrapolated or frame-averaged (:func:`needs_raw_dark`).
    """
    nints, ngroups = data.shape[:2]
    if dark_data is not None and dark_data.ndim == 3:
        dark_data = dark_data[np.newaxis]
    if dark_ngroups is None:
        if dark_data is None:
            raise ValueError("dark_ngroups is needed when dark_data is None")
        dark_ngroups = dark_data.shape[1]

    missing_frames = (total_frames(ngroups, nframes, groupgap)
                      - total_frames(dark_ngroups, dark_nframes, dark_groupgap))
    extra_groups = 0
    if missing_frames > 0:
        extra_groups = math.ceil((missing_frames + dark_groupgap) / (dark_nframes + dark_groupgap))

    if dark_nframes > nframes or dark_groupgap > groupgap:
        return False

    averaging = not (nframes == dark_nframes and groupgap == dark_groupgap)
    if dark_data is not None:
        n_dark_rows = dark_data.shape[0]
        for integ in range(nints):
            dark_int = dark_data[integ if n_dark_rows > 1 else 0]
            if extra_groups:
                dark_int = _extrapolated(dark_int, extra_groups)
            if averaging:
                _subtract_averaged(data[integ], dark_int, nframes, groupgap)
            elif nan_zeroed and not extra_groups:
                np.subtract(data[integ], dark_int[:ngroups], out=data[integ])
            else:
                for grp in range(ngroups):
                    _subtract_finite(data[integ, grp], dark_int[grp])

    if dark_pixeldq is not None:
        np.bitwise_or(pixeldq, np.asarray(dark_pixeldq).astype(pixeldq.dtype, copy=False),
                      out=pixeldq)
    return True


def needs_raw_dark(ngroups: int, nframes: int, groupgap: int, dark_ngroups: int,
                   dark_nframes: int, dark_groupgap: int) -> bool:
    """True when the dark is extrapolated or frame-averaged before it is subtracted: its
    NaN must then reach :func:`subtract_dark` as they are (no ``nan_zeroed``), and all
    its groups are needed."""
    averaging = not (nframes == dark_nframes and groupgap == dark_groupgap)
    return averaging or (total_frames(ngroups, nframes, groupgap)
                         > total_frames(dark_ngroups, dark_nframes, dark_groupgap))


def _subtract_finite(plane: np.ndarray, dark_plane: np.ndarray) -> None:
    # a float64 dark plane (after extrapolation) subtracts in float64, rounded once
    defined = ~np.isnan(dark_plane)
    np.subtract(plane, dark_plane, out=plane, where=defined, casting="same_kind")


def _extrapolated(dark_int: np.ndarray, extra_groups: int) -> np.ndarray:
    """The dark integration extended by ``extra_groups`` groups, as jwst builds it (float64)."""
    last = dark_int[-1]
    step = dark_int[-1] - dark_int[-2]
    ahead = np.arange(1, extra_groups + 1).reshape(-1, 1, 1)
    extension = ahead * step + last
    return np.concatenate((dark_int.astype(np.float64), extension))


def _subtract_averaged(ramp: np.ndarray, dark_int: np.ndarray, nframes: int, groupgap: int) -> None:
    clean = np.where(np.isnan(dark_int), 0, dark_int)
    start = 0
    for grp in range(ramp.shape[0]):
        stop = start + nframes
        if nframes == 1:
            group_dark = clean[start].astype(np.float32)
        else:
            group_dark = clean[start:stop].mean(axis=0).astype(np.float32)
        np.subtract(ramp[grp], group_dark, out=ramp[grp])
        start = stop + groupgap


def average_dark_current(
    frame_shape: tuple[int, int],
    *,
    user_value: float | None = None,
    ref_array: np.ndarray | None = None,
    ref_scalar: float | None = None,
    input_array: np.ndarray | None = None,
) -> np.ndarray:
    """The float32 ``[nrows, nx]`` average dark current ramp_fit will use, as jwst picks it.

    Priority: the step parameter ``user_value``; else the dark's 2-D AVDRKCUR array
    ``ref_array`` if present and not all zero - but only when the input ramp already had
    an ``input_array`` of the same shape (otherwise jwst warns and keeps the input's
    array, or nothing, which ramp_fit reads as zeros); else the dark header's scalar
    AVDRKCUR ``ref_scalar`` (0 if absent) over the whole frame.
    """
    zeros = np.zeros(frame_shape, dtype=np.float32)
    if user_value is not None:
        return zeros + user_value
    if ref_array is None or np.sum(ref_array) == 0.0:
        return zeros + (0.0 if ref_scalar is None else ref_scalar)
    if np.shape(input_array) != np.shape(ref_array):
        return zeros if input_array is None else np.asarray(input_array, dtype=np.float32)
    return np.asarray(ref_array, dtype=np.float32)


# --- step plugin (added by the engine work) ---

from streamdet.core.plugins import hookimpl  # noqa: E402
from streamdet.core.step import Step  # noqa: E402

from . import follows  # noqa: E402


#: the axes of the dark's SCI (a 3-D dark is one integration) and DQ arrays
SCI_LAYOUT = ("nints?", "ngroups", "ny", "nx")
DQ_LAYOUT = ("nints?", "ngroups?", "ny", "nx")


class DarkCurrentStep(Step):
    """Subtracts the integration-dependent MIRI dark (jwst 3.0 ``dark_current``).

    Reads one dark integration at a time. Leaves ``average_dark_current`` (e-/s per
    pixel) in the exposure state for ramp_fit's Poisson variance."""

    name = "dark_current"
    after = follows("dark_current")
    reftypes = ("dark",)
    status_keyword = "S_DARK"
    thread_safe = True

    def prepare(self, meta, refs, pixeldq):
        shape = refs.shape("dark", "SCI", SCI_LAYOUT)
        self.ndim = len(shape)
        self.dark_nints = shape[0] if self.ndim == 4 else 1
        self.dark_ngroups = shape[-3]
        self.dark_nframes = int(refs.number("dark", "NFRAMES", 1) or 1)
        self.dark_groupgap = int(refs.number("dark", "GROUPGAP", 0) or 0)
        if self.dark_nframes > meta.nframes or self.dark_groupgap > meta.groupgap:
            return "the dark has larger NFRAMES or GROUPGAP than the exposure"
        if (self.dark_ngroups < 2 and total_frames(meta.ngroups, meta.nframes, meta.groupgap)
                > total_frames(self.dark_ngroups, self.dark_nframes, self.dark_groupgap)):
            # a dark shorter than the exposure is extended from its last two groups
            refs.shape("dark", "SCI", ("nints?", "ngroups>=2", "ny", "nx"),
                       why=f"the exposure's {meta.ngroups} groups span more frames than the "
                           "dark, which is then extrapolated from its last two groups")
        self.averaging = (self.dark_nframes, self.dark_groupgap) != (meta.nframes, meta.groupgap)
        self.meta, self.refs = meta, refs
        dq_index = (slice(None), 0) if len(refs.shape("dark", "DQ", DQ_LAYOUT)) == 4 else ()
        np.bitwise_or(pixeldq, combined_dark_dq(refs.dq("dark", index=dq_index)), out=pixeldq)
        scalar = refs.number("dark", "AVDRKCUR", None, float)
        meta.state.average_dark_current = average_dark_current(
            (meta.ny, meta.nx), ref_scalar=scalar)
        # the plain case reads only the groups it subtracts, with NaN already zeroed
        self.raw = needs_raw_dark(meta.ngroups, meta.nframes, meta.groupgap, self.dark_ngroups,
                                  self.dark_nframes, self.dark_groupgap)
        # dark integrations that several science integrations use stay converted
        chosen = [self._chosen(int(i)) for i in meta.int_index]
        self.reused = {k for k in chosen if k is not None and (chosen.count(k) > 1 or self.ndim == 3)}
        return None

    def _chosen(self, int_index: int) -> int | None:
        return dark_int_for(int_index, self.dark_nints, intstart=self.meta.intstart,
                            file_nints=self.meta.nints, frames_averaged=self.averaging)

    def _dark_for(self, int_index: int, rows: slice):
        chosen = self._chosen(int_index)
        if chosen is None:
            return None
        groups = slice(None) if self.raw else slice(0, self.meta.ngroups)
        index = (chosen, groups) if self.ndim == 4 else (groups,)
        return self.refs.block("dark", "SCI", index=index, rows=rows, nan_to_zero=not self.raw,
                               cache=chosen in self.reused, transient=True)

    def process(self, chunk):
        for k, int_index in enumerate(chunk.int_index):
            dark = self._dark_for(int(int_index), chunk.rows)
            subtract_dark(chunk.data[k:k + 1], chunk.pixeldq, dark, None,
                          nframes=self.meta.nframes, groupgap=self.meta.groupgap,
                          dark_nframes=self.dark_nframes, dark_groupgap=self.dark_groupgap,
                          dark_ngroups=self.dark_ngroups, nan_zeroed=not self.raw)


@hookimpl
def streamdet_steps():
    return [DarkCurrentStep]

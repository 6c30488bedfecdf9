"""RSCD: mark the leading groups of each MIRI integration as unusable.

The reset-switch-charge-decay (RSCD) transient bends the first few groups after a
detector reset.  jwst 3.0 no longer models it; its ``rscd`` step only flags those groups
DO_NOT_USE so that the ramp fit ignores them.  This module reproduces that behaviour.

How many groups to drop comes from the RSCD reference's ``RSCD_GROUP_SKIP`` table
(columns ``subarray``, ``readpatt``, ``group_skip1``, ``group_skip``): the first row whose
subarray and read pattern equal the exposure's gives one number for the exposure's very
first integration (``group_skip1``) and one for every later integration
(``group_skip``).  jwst then adjusts them:

* no matching row, or fewer than 3 groups: the step is skipped;
* a negative ``group_skip1`` (old reference layout) is read as 1;
* with 5 groups or fewer both numbers become 1;
* a number leaving fewer than 3 groups is lowered to ``ngroups - 3`` (not below 0).

Saturation back-off, per pixel: with ``n`` groups to drop, the groups ``n`` and ``n+1``
(0-based) should stay usable.  jwst walks down from group ``n+1``: while some pixel is
SATURATED at the examined group (and not already at group 0), those pixels drop one
group fewer (never below zero) and the walk moves one group earlier, down to group 1.
With the saturation step's cumulative flags this leaves ``max(first_sat - 2, 0)`` groups
dropped for a pixel whose first saturated group ``first_sat`` is at most ``n+1``.  Pixels whose count
was lowered in any integration get FLUX_ESTIMATED in the pixel DQ; pixels saturated in
group 0 keep the full count.

jwst treats the exposure's first integration (absolute index 0: in a segmented file
only the first segment holds it) on its own, and all other integrations of the file as
one batch.  The walk stops early when no pixel of the batch is saturated at the examined
group; with cumulative saturation flags that stop changes no pixel, so streaming the
integrations one at a time gives jwst's answer.  A SATURATED pattern that is not
cumulative in time (never produced by the saturation step) could differ between a batch
and a stream.

Header keywords (jwst ``meta.rscd``), accumulated by :class:`RscdTally`:

``INT1SKIP`` / ``INT2SKIP``
    the (adjusted) number of leading groups dropped in integration 1 / integrations 2+.
``INT1BORS`` / ``INT2BORS``
    number of pixels whose count was backed off because of saturation, a pixel counted
    once however many of the integrations it happened in.
``INT1UGP1`` / ``INT2UGP1``
    number of pixels left with zero groups dropped (group 1 kept) in any of those
    integrations.  jwst counts them only when the batch had a pixel needing back-off;
    with a nominal count of 0 that makes it every pixel of the frame.

The ``INT1*`` keywords are written only when the file holds the exposure's first
integration; the ``INT2*`` ones whenever the exposure has more than one integration
(even if this file holds none of them: then the counts are 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from streamdet.core import dqflags

TABLE_EXTENSION = "RSCD_GROUP_SKIP"

#: an old name of the MIRI LRS slitless subarray, looked up under its current name
_SUBARRAY_RENAMES = {"SUBPRISM": "SLITLESSPRISM"}

_SATURATED = np.uint8(dqflags.SATURATED)
_DO_NOT_USE = np.uint8(dqflags.DO_NOT_USE)
_FLUX_ESTIMATED = np.uint32(dqflags.FLUX_ESTIMATED)


# ----------------------------------------------------------------------------------------
# reference table lookup
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RscdPlan:
    """What the step will do for one exposure.

    ``skip_first_int`` / ``skip_later_ints`` are None when ``status == "SKIPPED"``.
    ``messages`` are log lines (warnings first) explaining adjustments or the skip.
    """

    status: str
    skip_first_int: int | None = None
    skip_later_ints: int | None = None
    messages: tuple[str, ...] = ()

    @property
    def applies(self) -> bool:
        return self.status == "COMPLETE"


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("ascii", errors="replace")
    # FITS character fields are blank padded; trailing blanks carry no meaning
    return str(value).rstrip()


def _column_lookup(table_rows: Any) -> tuple[list[str], Any]:
    """The column names of a structured array / FITS_rec / astropy Table."""
    names = getattr(getattr(table_rows, "dtype", None), "names", None)
    if names is None:
        names = getattr(table_rows, "colnames", None)
    if names is None:
        raise TypeError("RSCD group-skip table: expected a structured array or a Table")
    return list(names), table_rows


def _pick(names: list[str], wanted: str) -> str | None:
    for name in names:
        if name.lower() == wanted:
            return name
    return None


def lookup_group_skips(table_rows: Any, subarray: str | None,
                       readpatt: str | None) -> tuple[int, int] | None:
    """Raw ``(group_skip1, group_skip)`` of the first row matching the exposure, or None.

    Matching is exact (case-sensitive) on both names after FITS blank trimming; the
    subarray ``SUBPRISM`` is looked up as ``SLITLESSPRISM``.  A table without a
    ``group_skip1`` column yields -1 for it (the old layout), as jwst reads it.
    """
    names, rows = _column_lookup(table_rows)
    col_sub = _pick(names, "subarray")
    col_patt = _pick(names, "readpatt")
    col_later = _pick(names, "group_skip")
    col_first = _pick(names, "group_skip1")
    if col_sub is None or col_patt is None or col_later is None:
        raise ValueError(
            f"RSCD group-skip table lacks subarray/readpatt/group_skip columns (has {names})")
    if subarray is None or readpatt is None:
        return None
    wanted_sub = str(subarray)
    wanted_sub = _SUBARRAY_RENAMES.get(wanted_sub.upper(), wanted_sub)
    wanted_patt = str(readpatt)
    subs = rows[col_sub]
    patts = rows[col_patt]
    for k in range(len(subs)):
        if _text(subs[k]) == wanted_sub and _text(patts[k]) == wanted_patt:
            later = int(rows[col_later][k])
            first = int(rows[col_first][k]) if col_first is not None else -1
            return first, later
    return None


def plan_rscd(table_rows: Any, subarray: str | None, readpatt: str | None,
              ngroups: int) -> RscdPlan:
    """Apply jwst's lookup and adjustment rules; see the module docstring."""
    raw = lookup_group_skips(table_rows, subarray, readpatt)
    if raw is None:
        return RscdPlan("SKIPPED", messages=(
            "READPATT, SUBARRAY combination not found in ref file: "
            "RSCD correction will be skipped",))
    first, later = raw
    notes: list[str] = []
    if first < 0:
        notes.append("RSCD reference file is of a deprecated model: no value for the "
                     "first integration; flagging 1 group in integration 1")
        first = 1
    if ngroups < 3:
        return RscdPlan("SKIPPED", messages=tuple(notes) + (
            "Too few groups to apply RSCD correction: RSCD step will be skipped",))
    if ngroups <= 5:
        first = later = 1
        notes.append("ngroups <= 5: flagging 1 group in every integration")
    # jwst lowers the later-integration count only when NINTS > 1; with a single
    # integration that count is neither used nor written, so lowering it always is safe.
    most = max(0, ngroups - 3)
    if ngroups < first + 3 and first != most:
        notes.append(f"Changing the # of groups to skip in int 1 to {most}")
        first = most
    if ngroups < later + 3 and later != most:
        notes.append(f"Changing the # of groups to skip in int 2 and higher to {most}")
        later = most
    return RscdPlan("COMPLETE", first, later, tuple(notes))


def group_skips_for(table_rows: Any, subarray: str | None, readpatt: str | None,
                    ngroups: int) -> tuple[int, int] | None:
    """``(skip_first_int, skip_later_ints)`` after jwst's rules, or None if the step skips."""
    plan = plan_rscd(table_rows, subarray, readpatt, ngroups)
    if not plan.applies:
        return None
    return plan.skip_first_int, plan.skip_later_ints


# ----------------------------------------------------------------------------------------
# flagging kernel
# ----------------------------------------------------------------------------------------

@dataclass
class _ClassTally:
    """Back-off bookkeeping for one class of integrations (first, or later)."""

    backed_off: np.ndarray | None = None
    first_group_kept: np.ndarray | None = None
    needed_backoff: bool = False
    seen: int = 0

    def add(self, backed_off: np.ndarray, first_group_kept: np.ndarray,
            needed_backoff: bool) -> None:
        if self.backed_off is None:
            self.backed_off = backed_off.copy()
            self.first_group_kept = first_group_kept.copy()
        else:
            self.backed_off |= backed_off
            self.first_group_kept |= first_group_kept
        self.needed_backoff |= needed_backoff
        self.seen += 1

    def merge(self, other: "_ClassTally", rows: slice, frame_shape: tuple[int, int]) -> None:
        """Add ``other``, the tally of a band of rows ``rows``, to this frame-wide tally."""
        if other.backed_off is None:
            return
        if self.backed_off is None:
            self.backed_off = np.zeros(frame_shape, dtype=bool)
            self.first_group_kept = np.zeros(frame_shape, dtype=bool)
        self.backed_off[rows] |= other.backed_off
        self.first_group_kept[rows] |= other.first_group_kept
        self.needed_backoff |= other.needed_backoff
        self.seen += other.seen

    def counts(self) -> tuple[int, int]:
        """(pixels backed off, pixels with group 1 kept) as jwst reports them."""
        if self.backed_off is None:
            return 0, 0
        kept = int(self.first_group_kept.sum()) if self.needed_backoff else 0
        return int(self.backed_off.sum()), kept


@dataclass
class RscdTally:
    """Accumulates, over streamed integrations, what jwst writes to the header.

    Feed it to :func:`flag_rscd_groups` for every integration of the file, then call
    :meth:`header_keywords`.
    """

    skip_first_int: int
    skip_later_ints: int
    first: _ClassTally = field(default_factory=_ClassTally)
    later: _ClassTally = field(default_factory=_ClassTally)

    def header_keywords(self, exposure_nints: int, holds_first_int: bool | None = None
                        ) -> dict[str, int]:
        """FITS keywords for this file.

        ``exposure_nints`` is the exposure's NINTS (not the file's count).
        ``holds_first_int`` says whether this file contains the exposure's first
        integration (INTSTART absent or 1); by default, whether it was flagged here.
        """
        if holds_first_int is None:
            holds_first_int = self.first.seen > 0
        out: dict[str, int] = {}
        if holds_first_int:
            bors, ugp1 = self.first.counts()
            out.update(INT1SKIP=int(self.skip_first_int), INT1UGP1=ugp1, INT1BORS=bors)
        if exposure_nints > 1:
            bors, ugp1 = self.later.counts()
            out.update(INT2SKIP=int(self.skip_later_ints), INT2UGP1=ugp1, INT2BORS=bors)
        return out


def _backed_off_skips(groupdq: np.ndarray, nominal: int) -> tuple[np.ndarray, bool]:
    """Per (integration, pixel) number of leading groups to drop, after back-off.

    ``groupdq`` holds one batch of integrations [n, ngroups, ny, nx].  Returns the
    counts (int32 [n, ny, nx]) and whether any pixel needed back-off at the start.
    """
    n, ngroups, ny, nx = groupdq.shape
    counts = np.full((n, ny, nx), nominal, dtype=np.int32)
    if nominal < 0 or n == 0:
        # jwst then examines no group in a way that changes anything: no flags at all
        return counts, False
    level = nominal + 1
    if level >= ngroups:
        raise ValueError(f"rscd: {nominal} groups to drop needs at least {nominal + 2} groups "
                         f"(have {ngroups}); use plan_rscd() to adjust the count")
    sat_at_start = (groupdq[:, 0] & _SATURATED) != 0

    def blocked(g: int) -> np.ndarray:
        hit = (groupdq[:, g] & _SATURATED) != 0
        hit &= ~sat_at_start
        return hit

    hit = blocked(level)
    needed = bool(hit.any())
    any_hit = needed
    while any_hit and level >= 1:
        counts[hit] -= 1
        level -= 1
        hit = blocked(level)
        any_hit = bool(hit.any())
    np.maximum(counts, 0, out=counts)
    return counts, needed


def _flag_batch(groupdq: np.ndarray, pixeldq: np.ndarray, nominal: int,
                tally: _ClassTally) -> None:
    counts, needed = _backed_off_skips(groupdq, nominal)
    backed = (counts < nominal).any(axis=0)
    kept_first = (counts == 0).any(axis=0)
    if needed:
        pixeldq[backed] |= _FLUX_ESTIMATED
    tally.add(backed, kept_first, needed)
    if nominal <= 0:
        return
    if not needed:
        groupdq[:, :nominal] |= _DO_NOT_USE
        return
    for g in range(nominal):
        plane = groupdq[:, g]
        np.bitwise_or(plane, _DO_NOT_USE, out=plane, where=counts > g)


def flag_rscd_groups(groupdq: np.ndarray, pixeldq: np.ndarray, int_index: Iterable[int],
                     skip_first_int: int, skip_later_ints: int,
                     tally: RscdTally | None = None) -> RscdTally:
    """Flag the leading RSCD groups DO_NOT_USE, in place.

    ``groupdq`` uint8 [nints, ngroups, ny, nx]; ``pixeldq`` uint32 [ny, nx] receives
    FLUX_ESTIMATED where the count was backed off; ``int_index`` the absolute 0-based
    integration number of each plane.  The counts come from :func:`plan_rscd`.  The
    integration with absolute index 0 uses ``skip_first_int``; all other integrations of
    the call form one batch using ``skip_later_ints`` (jwst's batching when the whole
    file is passed; see the module docstring for streaming).  Returns the tally, updated
    (a new one if none was given).
    """
    if tally is None:
        tally = RscdTally(int(skip_first_int), int(skip_later_ints))
    int_index = np.asarray(int_index).reshape(-1)
    if int_index.size != groupdq.shape[0]:
        raise ValueError(f"rscd: int_index has {int_index.size} entries for "
                         f"{groupdq.shape[0]} integrations")
    is_first = int_index == 0
    if is_first.any():
        where = np.flatnonzero(is_first)
        for k in where:  # normally one plane; a repeated index 0 would be a caller bug
            _flag_batch(groupdq[k:k + 1], pixeldq, int(skip_first_int), tally.first)
    later = np.flatnonzero(~is_first)
    if later.size:
        lo, hi = int(later[0]), int(later[-1]) + 1
        if hi - lo == later.size:
            _flag_batch(groupdq[lo:hi], pixeldq, int(skip_later_ints), tally.later)
        else:
            picked = groupdq[later]
            _flag_batch(picked, pixeldq, int(skip_later_ints), tally.later)
            groupdq[later] = picked
    return tally

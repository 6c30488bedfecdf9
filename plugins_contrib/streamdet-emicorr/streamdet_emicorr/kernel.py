"""EMI fit and subtraction on numpy arrays: jwst 3.0's ``emicorr`` "joint" algorithm.

The readout clock
-----------------
MIRI reads its four amplifiers together: columns ``4k .. 4k+3`` of a row are sampled at
the same tick of the 10 us pixel clock, ``nsamples`` ticks per column group (1 in FAST
mode). A new row starts every ``rowclocks`` ticks, and the detector rows outside a
subarray are skipped at 7 ticks each, so one frame (= one group, NFRAMES = 1) lasts
``ny * rowclocks + (1024 - ny) * 7`` ticks. Between integrations (FASTR1 / SLOWR1) one
more reset frame of ``frameclocks`` ticks passes. An interference of frequency ``f`` has a
period of ``P = 1 / (f * 10 us)`` ticks, so relative to the first read of the file the
cycle stands at

    phase(i, g, y, k) = frac(spatial(y, k) / P + g * dphase + i * dphase_int + offset)

with ``spatial = y * rowclocks + k * nsamples``, ``dphase = frac(frame / P)`` and
``dphase_int = ngroups * dphase + frameclocks / P``. :class:`PhaseGrid` holds these.

The joint fit
-------------
The EMI waveform ``w`` (one cycle, sampled at bin centres ``(n + 0.5) / N``, interpolated
by a periodic-wrapped cubic spline) is fitted by amplitude ``c`` and phase offset: for
each trial offset the model is "every pixel's ramp is a straight line plus ``c`` times the
phased waveform", and the offset and amplitude that leave the straightest ramps (least
chi-squared) win. Only quiet pixels take part: those whose standard deviation over the
groups is below twice the median of that statistic over all pixels and integrations, and
whose pixel DQ is 0; the column groups 1 and 2 (columns 4-11) are left out, as jwst does.

Because the waveform is the same for every pixel at the same phase, the pixels are summed
into ``N`` phase bins (by the phase of their first group) first: per integration and bin
the sum of the data per group and the number of pixels. The chi-squared as a function of
``c`` is then a quadratic ``a c^2 + b c`` whose coefficients come from these sums and from
the waveform's sums at the trial offset (ordinary least-squares algebra: a line fitted to
each pixel, the waveform's residual after the line fit). ``nphases_opt`` offsets on a
regular grid are tried, a parabola through the best three refines the offset, and the
amplitude is taken at that offset. By default one amplitude and one offset serve all
integrations (their offsets follow from the clock); ``separate=True`` fits each
integration alone. Frequencies are fitted and subtracted one after the other, each on the
data the previous ones left.

Numbers follow jwst: float64 sums, float32 data updated in place
(``float32(float64(data) - c * w)``), the same trial grid and its rounding, the same
parabola; see the package README for the agreement measured against jwst itself.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

#: one tick of the MIRI pixel clock, s
PIXEL_CLOCK_S = 10e-6
#: rows of the full detector; a subarray skips the others at SKIPPED_ROW_CLOCKS each
FULL_FRAME_ROWS = 1024
SKIPPED_ROW_CLOCKS = 7.0
#: column groups (of four columns) left out of the fit sums, as in jwst
EXCLUDED_COLUMN_GROUPS = (1, 2)
#: pixel-std stacks larger than this live in a temporary file during the fit
STD_STACK_IN_MEMORY_BYTES = 128 * 1024**2


@dataclass(frozen=True)
class Readout:
    """The clock numbers of one readout (an EMICORR reference's subarray case).

    ``rowclocks``: ticks from one row to the next; ``frameclocks``: ticks of the reset
    frame between integrations (0 when the read pattern has none); ``nsamples``: ticks
    per column group (the NSAMPLES keyword)."""

    rowclocks: int
    frameclocks: int
    nsamples: int = 1


class PhaseGrid:
    """Where one frequency's cycle stands at every read of a ``[ngroups, ny, nx]`` frame."""

    def __init__(self, frequency_hz: float, readout: Readout, ny: int, nx: int, ngroups: int):
        if nx % 4:
            raise ValueError(f"emicorr: {nx} columns are not four amplifiers' worth")
        self.frequency_hz = float(frequency_hz)
        self.readout = readout
        self.ngroups = ngroups
        #: period in pixel-clock ticks
        self.period = (1.0 / self.frequency_hz) / PIXEL_CLOCK_S
        nx4 = nx // 4
        ticks = (np.arange(ny, dtype=np.int64)[:, None] * int(readout.rowclocks)
                 + np.arange(nx4, dtype=np.int64)[None, :] * int(readout.nsamples))
        #: [ny, nx // 4] phase (cycles, 0..1) of each column group's read in group 0
        self.phase = (ticks.astype(np.float64) / self.period) % 1
        frame_ticks = ny * readout.rowclocks + (FULL_FRAME_ROWS - ny) * SKIPPED_ROW_CLOCKS
        #: phase advance from one group to the next
        self.dphase = (frame_ticks / self.period) % 1
        #: phase advance from one integration to the next (not wrapped)
        self.dphase_int = self.dphase * ngroups + readout.frameclocks / self.period

    def integration_phase(self, offset: float, i: int) -> float:
        """Offset of integration ``i`` (file-local) given that of integration 0."""
        return (offset + i * self.dphase_int) % 1


class Waveform:
    """One cycle of an EMI waveform sampled at bin centres, as a periodic cubic spline."""

    def __init__(self, samples: Sequence[float]):
        values = np.asarray(samples)
        if values.ndim != 1 or values.size < 4:
            raise ValueError("emicorr: a waveform needs at least 4 samples")
        n = values.size
        self.samples = values
        self.nbins = n
        wrapped = np.concatenate((values[-1:], values, values[:1])).astype(np.float64)
        at = (np.arange(n + 2) - 0.5) / n
        # scipy.interpolate takes ~0.3 s to import: only when EMI is really corrected
        from scipy.interpolate import make_interp_spline  # noqa: PLC0415

        self._spline = make_interp_spline(at, wrapped, k=3)
        #: bin centres (cycles)
        self.centres = at[1:-1]

    def __call__(self, phase: np.ndarray) -> np.ndarray:
        return self._spline(phase)


def sinusoid(nsamples: int = 500) -> np.ndarray:
    """A unit sine cycle sampled at bin centres, float32 as reference files store it."""
    return np.sin(2.0 * math.pi * (np.arange(nsamples) + 0.5) / nsamples).astype(np.float32)


# --- statistics over quiet pixels ---------------------------------------------------------
def group_std(ramp: np.ndarray) -> np.ndarray:
    """Standard deviation over the groups of one integration ``[ngroups, ny, nx]``."""
    return np.std(ramp, axis=0)


class StdStack:
    """The per-integration pixel std maps of one exposure (float32), in memory or, when
    large, in a temporary file."""

    def __init__(self, nints: int, ny: int, nx: int, in_memory_bytes: int = STD_STACK_IN_MEMORY_BYTES):
        self._dir = None
        if nints * ny * nx * 4 <= in_memory_bytes:
            self.maps = np.empty((nints, ny, nx), np.float32)
        else:
            self._dir = tempfile.TemporaryDirectory(prefix="streamdet-emicorr-")
            self.maps = np.lib.format.open_memmap(Path(self._dir.name) / "std.npy", "w+",
                                                  np.float32, (nints, ny, nx))

    def __len__(self) -> int:
        return self.maps.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.maps[i]

    def __setitem__(self, i: int, value: np.ndarray) -> None:
        self.maps[i] = value

    def close(self) -> None:
        self.maps = None
        if self._dir is not None:
            self._dir.cleanup()


def exact_median(planes) -> np.float32:
    """``np.median`` of the float32 values of all ``planes`` (each ``planes[i]`` an
    array of values >= 0), without holding them all at once: a two-level radix
    selection on the IEEE bit patterns (which sort like the values for x >= 0). NaN
    anywhere gives NaN, as numpy does."""
    n = 0
    top_hist = np.zeros(1 << 16, np.int64)
    for i in range(len(planes)):
        bits = np.ascontiguousarray(planes[i], dtype=np.float32).view(np.uint32).ravel()
        if np.isnan(bits.view(np.float32)).any():
            return np.float32(np.nan)
        n += bits.size
        top_hist += np.bincount(bits >> 16, minlength=1 << 16)
    if n == 0:
        return np.float32(np.nan)
    top_cum = np.cumsum(top_hist)

    def value_at(rank: int) -> np.float32:
        top = int(np.searchsorted(top_cum, rank, side="right"))
        before = int(top_cum[top - 1]) if top else 0
        low_hist = np.zeros(1 << 16, np.int64)
        for i in range(len(planes)):
            bits = np.ascontiguousarray(planes[i], dtype=np.float32).view(np.uint32).ravel()
            low_hist += np.bincount(bits[(bits >> 16) == top] & 0xFFFF, minlength=1 << 16)
        low = int(np.searchsorted(np.cumsum(low_hist), rank - before, side="right"))
        return np.array([(top << 16) | low], np.uint32).view(np.float32)[0]

    if n % 2:
        return value_at(n // 2)
    lower, upper = value_at(n // 2 - 1), value_at(n // 2)
    # numpy averages the two middle values in float32
    return np.float32(np.float32(lower + upper) / np.float32(2))


def quiet_pixels(std_map: np.ndarray, median: np.float32, pixeldq: np.ndarray) -> np.ndarray:
    """Pixels of one integration that take part in the fit."""
    return (std_map < 2 * median) & (pixeldq == 0)


# --- phase-bin sums --------------------------------------------------------------------------
class PhaseBinSums:
    """Per integration and phase bin (of the first group's phase): the sum over quiet
    pixels of the data of each group, and the number of those pixels."""

    def __init__(self, grid: PhaseGrid, nbins: int, nints: int):
        ny, nx4 = grid.phase.shape
        bins = (grid.phase * nbins).astype(np.int64)
        bins[:, [k for k in EXCLUDED_COLUMN_GROUPS if k < nx4]] = nbins  # a bin never read
        #: [ny * nx] bin of every pixel (the four columns of a group share it)
        self.bins = np.repeat(bins, 4, axis=1).ravel()
        self.nbins = nbins
        self.y = np.zeros((nints, nbins, grid.ngroups))
        self.n = np.zeros((nints, nbins))

    def add(self, i: int, ramp: np.ndarray, quiet: np.ndarray) -> None:
        """Add integration ``i``: ``ramp`` float32 ``[ngroups, ny, nx]``, ``quiet`` bool."""
        size = self.nbins + 1
        weight = quiet.ravel()
        self.n[i] += np.bincount(self.bins, weights=weight.astype(np.float64), minlength=size)[:-1]
        for g in range(ramp.shape[0]):
            # float32 products, float64 sums in pixel order (row, then column)
            values = (ramp[g] * quiet).ravel().astype(np.float64)
            self.y[i, :, g] += np.bincount(self.bins, weights=values, minlength=size)[:-1]


# --- the fit ----------------------------------------------------------------------------------
@dataclass
class _Quadratics:
    """chi^2(c) = a c^2 + b c per integration and trial offset on the regular grid."""

    a: np.ndarray       # [nints, ntrial]
    b: np.ndarray
    trials: np.ndarray  # [ntrial] offsets (cycles)


def _quadratics(sums: PhaseBinSums, grid: PhaseGrid, wave: Waveform, ntrial: int,
                block: int = 25) -> _Quadratics:
    nints, nbins, ngroups = sums.y.shape
    t = np.arange(ngroups)
    s_tt = np.sum(t**2)
    s_t = np.sum(t)
    delta = ngroups * s_tt - s_t**2
    s_y = np.sum(sums.y, axis=2)          # [nints, nbins]
    s_ty = np.sum(sums.y * t, axis=2)
    trials = np.arange(ntrial) * 1.0 / ntrial
    template = (wave.centres[:, None] + t * grid.dphase) % 1  # [nbins, ngroups]
    a = np.empty((nints, ntrial))
    b = np.empty((nints, ntrial))
    for k0 in range(0, ntrial, block):
        ks = slice(k0, min(ntrial, k0 + block))
        z = wave((template[None, :, :] + trials[ks, None, None]) % 1)  # [K, nbins, ngroups]
        s_z = np.sum(z, axis=2)
        s_tz = np.sum(t * z, axis=2)
        s_zz = np.sum(z**2, axis=2)
        z_resid = -s_tt * s_z**2 + 2 * s_t * s_z * s_tz - ngroups * s_tz**2 + s_zz * delta
        for i in range(nints):
            a[i, ks] = np.sum(sums.n[i] / delta * z_resid, axis=1)
            cross = (s_tt * s_z * s_y[i] - s_t * s_tz * s_y[i] - s_t * s_z * s_ty[i]
                     + ngroups * s_tz * s_ty[i])
            b[i, ks] = (2 / delta) * np.sum(cross, axis=1)
            b[i, ks] -= 2 * np.sum(np.sum(z * sums.y[i], axis=2), axis=1)
    return _Quadratics(a, b, trials)


def _trial_index(trials: np.ndarray, offset: np.ndarray | float, shift: float) -> np.ndarray:
    """Index of the grid offset at or just above ``offset + shift`` (cyclically), the
    rounding jwst uses to carry an offset from integration 0 to a later one."""
    offset = np.atleast_1d(offset)
    return np.argmin(np.abs((trials[None, :] - offset[:, None] - shift) % 1), axis=1)


def _solve(a: float, b: float) -> tuple[float, float]:
    """(chi^2 change, amplitude) of the quadratic; (NaN, 0) when it is degenerate."""
    if math.isclose(a, 0.0, abs_tol=1e-8) or not (math.isfinite(a) and math.isfinite(b)):
        return math.nan, 0.0
    c = -b / (2 * a)
    return a * c**2 + b * c, c


def _chisq_curve(q: _Quadratics, grid: PhaseGrid, ints: Sequence[int]) -> np.ndarray:
    a = np.zeros(q.trials.size)
    b = np.zeros(q.trials.size)
    for i in ints:
        k = _trial_index(q.trials, q.trials, i * grid.dphase_int)
        a += q.a[i, k]
        b += q.b[i, k]
    return np.array([_solve(x, y)[0] for x, y in zip(a, b)])


def _amplitude_at(q: _Quadratics, grid: PhaseGrid, ints: Sequence[int], offset: float) -> float:
    a = b = 0.0
    for i in ints:
        k = int(_trial_index(q.trials, offset, i * grid.dphase_int)[0])
        a += q.a[i, k]
        b += q.b[i, k]
    return _solve(a, b)[1]


def best_offset(trials: np.ndarray, chisq: np.ndarray) -> float:
    """The offset of least chi-squared: the vertex of the parabola through the best grid
    point and its two neighbours (taken cyclically; like jwst, the parabola is fitted to
    the raw grid values, so a minimum at the grid's first or last point is not
    unwrapped). Falls back to the grid point when the three values are equal or not
    finite."""
    if not np.isfinite(chisq).any():
        return float(trials[0])
    best = int(np.nanargmin(chisq))
    after = best + 1 if best + 1 < len(chisq) else 0
    values = [chisq[best - 1], chisq[best], chisq[after]]
    if not np.all(np.isfinite(values)) or np.nanstd(values) == 0:
        return float(trials[best])
    curve = np.polyfit([trials[best - 1], trials[best], trials[after]], values, 2)
    return float(-curve[1] / (2 * curve[0]))


def fit_phase_amplitude(sums: PhaseBinSums, grid: PhaseGrid, wave: Waveform, *,
                        nphases_opt: int = 500, separate: bool = False
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and phase offset to subtract in each integration: ``(amplitudes,
    offsets)``, both ``[nints]``."""
    q = _quadratics(sums, grid, wave, nphases_opt)
    nints = sums.y.shape[0]
    if separate:
        amplitudes, offsets = [], []
        for i in range(nints):
            offset = best_offset(q.trials, _chisq_curve(q, grid, [i]))
            offsets.append(offset + i * grid.dphase_int)
            amplitudes.append(_amplitude_at(q, grid, [i], offset))
        return np.array(amplitudes), np.array(offsets)
    everything = range(nints)
    offset = best_offset(q.trials, _chisq_curve(q, grid, everything))
    amplitude = _amplitude_at(q, grid, everything, offset)
    return (np.full(nints, amplitude),
            (offset + np.arange(nints) * grid.dphase_int) % 1)


def subtract(ramp: np.ndarray, grid: PhaseGrid, wave: Waveform, amplitude: float,
             offset: float) -> None:
    """Subtract ``amplitude`` times the phased waveform from one integration
    ``[ngroups, ny, nx]`` (float32, in place); ``offset`` is that integration's."""
    for g in range(ramp.shape[0]):
        emi = amplitude * wave((grid.phase + grid.dphase * g + offset) % 1)
        for k in range(4):  # the four amplifiers read their columns together
            columns = ramp[g, :, k::4]
            np.subtract(columns, emi, out=columns, casting="same_kind")


# --- a whole exposure, streamed ---------------------------------------------------------
@dataclass
class Component:
    """One frequency to correct: its name, value and waveform."""

    name: str
    frequency_hz: float
    waveform: np.ndarray


@dataclass
class Fitted:
    """A fitted frequency: what to subtract from each integration."""

    name: str
    grid: PhaseGrid
    wave: Waveform
    amplitudes: np.ndarray  # [nints] DN (waveform units)
    offsets: np.ndarray     # [nints] cycles
    quiet_pixels: list[int] = field(default_factory=list)

    @property
    def frequency_hz(self) -> float:
        return self.grid.frequency_hz

    def subtract(self, ramp: np.ndarray, i: int) -> None:
        subtract(ramp, self.grid, self.wave, float(self.amplitudes[i]), float(self.offsets[i]))


def apply_fits(ramp: np.ndarray, i: int, fitted: Sequence[Fitted]) -> None:
    """Correct integration ``i`` (``[ngroups, ny, nx]`` float32, in place) for every
    fitted frequency, in order."""
    for f in fitted:
        f.subtract(ramp, i)


def fit_exposure(read: Callable[[int], np.ndarray], nints: int, pixeldq: np.ndarray,
                 components: Sequence[Component], readout: Readout, *,
                 nphases_opt: int = 500, separate: bool = False,
                 std_in_memory_bytes: int = STD_STACK_IN_MEMORY_BYTES) -> list[Fitted]:
    """Fit every component to an exposure seen one integration at a time.

    ``read(i)`` returns a fresh float32 ``[ngroups, ny, nx]`` copy of integration ``i``
    as the step receives it. Each frequency needs two passes over the integrations (the
    pixel statistics, then the phase-bin sums), on the data corrected for the
    frequencies before it; nothing larger than one integration plus one float32 map per
    integration is held."""
    fitted: list[Fitted] = []
    for comp in components:
        std = None
        try:
            first = read(0)
            ngroups, ny, nx = first.shape
            grid = PhaseGrid(comp.frequency_hz, readout, ny, nx, ngroups)
            wave = Waveform(comp.waveform)
            std = StdStack(nints, ny, nx, std_in_memory_bytes)
            for i in range(nints):
                ramp = first if i == 0 else read(i)
                apply_fits(ramp, i, fitted)
                std[i] = group_std(ramp)
            del first
            median = exact_median(std)
            sums = PhaseBinSums(grid, wave.nbins, nints)
            used = []
            for i in range(nints):
                ramp = read(i)
                apply_fits(ramp, i, fitted)
                quiet = quiet_pixels(std[i], median, pixeldq)
                used.append(int(quiet.sum()))
                sums.add(i, ramp, quiet)
        finally:
            if std is not None:
                std.close()
        amplitudes, offsets = fit_phase_amplitude(sums, grid, wave, nphases_opt=nphases_opt,
                                                  separate=separate)
        fitted.append(Fitted(comp.name, grid, wave, amplitudes, offsets, used))
    return fitted


def correct_exposure(data: np.ndarray, pixeldq: np.ndarray, components: Sequence[Component],
                     readout: Readout, **options) -> list[Fitted]:
    """Fit and subtract EMI from a whole ramp ``[nints, ngroups, ny, nx]`` in memory
    (float32, in place); ``options`` as for :func:`fit_exposure`."""
    if data.dtype != np.float32:
        raise TypeError(f"emicorr: data must be float32, got {data.dtype}")
    fitted = fit_exposure(lambda i: np.array(data[i]), data.shape[0], pixeldq, components,
                          readout, **options)
    for i in range(data.shape[0]):
        apply_fits(data[i], i, fitted)
    return fitted

"""Simulated JWST MIRI imager exposures, their reference files and an offline CRDS cache.

:func:`simulate` writes, into one output directory,

* ``<name>_mirimage_uncal.fits`` -- a Level 1B ramp exposure (SCI ``uint16
  [nints, ngroups, ny, nx]`` stored as int16 + BZERO 32768, GROUP and INT_TIMES tables and the
  primary-header keywords that ``stdatamodels`` and ``jwst``'s ``Detector1Pipeline`` read);
* ``refs/`` -- every reference file the MIRI Detector1 steps ask for (mask, saturation,
  linearity, rscd, dark, gain, readnoise, reset), readable by the ``stdatamodels``
  reference models;
* ``crds_cache/`` -- a CRDS cache (``.pmap``/``.imap``/``.rmap`` mappings with valid
  checksums, ``config/jwst/server_config``, ``references/jwst/miri/``) from which the real
  ``crds`` client resolves all of the above with no network; every other reference type the
  pipeline asks for resolves to ``N/A``;
* ``truth/`` -- the true count rate per pixel and a JSON catalogue of what was injected
  (cosmic-ray jumps, saturating pixels, bad pixels, sources).

The physics is a forward model of what ``jwst`` undoes, in the order it undoes it, so
that the true rate is recoverable by the MIRI Detector1 chain (reset, linearity, dark,
refpix, jump, ramp_fit)::

    charge  Q(g)   = sum of Poisson increments of (sky + sources + dark + hot) electrons / gain
                     + cosmic-ray deposits (from their group on)
    linear  S(g)   = pedestal + Q(g) + dark anomaly(i, g) + RSCD anomaly (flagged groups only)
                     + last-frame offset (flagged group only) + amplifier drift (FULL only)
                     + read noise (sigma = READNOISE / sqrt(2) per read)
                     + telegraph noise (OTHER_BAD_PIXEL pixels only)
    raw     R(g)   = min(L^-1(S(g)), full well) + RESET(i, g), rounded to uint16

where ``L(x) = sum_k c_k x^k`` is the LINEARITY polynomial, applied by jwst to raw DN
*including* the pedestal. The DARK reference holds ``dark_rate * t_g + dark anomaly``
so that after jwst's dark subtraction the ramp slope is the truth rate exactly.

Everything is deterministic from the seed: the detector (pedestal, gain, noise,
non-linearity, saturation, bad pixels) is drawn for the full 1032 x 1024 frame from its own
random stream, so every subarray of one seed sees the same detector; the scene, the cosmic
rays and each integration's noise have their own streams. Only numpy and astropy are used;
large exposures are generated and written one group plane at a time.

Use::

    from streamdet.simulate import simulate, SimParams
    res = simulate("sim", subarray="SUB64", ngroups=10, nints=2, seed=0)
    res.uncal, res.refs["dark"], res.truth_rate        # paths
    print(res.shell_exports())                          # export CRDS_PATH=... CRDS_CONTEXT=...

``res.env`` selects the generated cache; crds reads it when it is first imported, so set
it before importing crds/jwst (a subprocess is the robust way).

Things jwst 3.0 needs that are easy to miss (found by running it on these files): the
Level 1B file must carry an ``ASDF`` extension (``Step.call(filename)`` reads the metadata
through it; a minimal hand-written one suffices); a 2-D ``AVDRKCUR`` plane in the dark is
ignored for file inputs (jwst compares its shape with the unset model array), so the mean
dark current goes in the scalar ``AVDRKCUR`` keyword; the RSCD table's column names must be
lower-case as in the schema (``GROUP_SKIP``/``GROUP_SKIP1`` upper-case fail to load).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from astropy.io import fits
from astropy.time import Time

__all__ = [
    "FULL_SHAPE",
    "SUBARRAYS",
    "Subarray",
    "SimParams",
    "SimResult",
    "SimulationError",
    "crds_env",
    "emi_read_clocks",
    "simulate",
]

# ---------------------------------------------------------------------------------------
# Detector geometry and timing
# ---------------------------------------------------------------------------------------

#: Full MIRI detector array, (rows, columns): 1024 rows of 1032 columns, of which columns
#: 0-3 and 1028-1031 are reference pixels that receive no light.
FULL_SHAPE = (1024, 1032)
#: Width of the reference-column strips at each side of the full frame.
N_REF_COLUMNS = 4

#: JWST DQ flag values (same numbers as ``stdatamodels.jwst.datamodels.dqflags.pixel``).
DQ = {
    "DO_NOT_USE": 1 << 0,
    "SATURATED": 1 << 1,
    "JUMP_DET": 1 << 2,
    "DEAD": 1 << 10,
    "HOT": 1 << 11,
    "WARM": 1 << 12,
    "LOW_QE": 1 << 13,
    "NONLINEAR": 1 << 16,
    "NO_LIN_CORR": 1 << 20,
    "NO_SAT_CHECK": 1 << 21,
    "UNRELIABLE_DARK": 1 << 23,
    "OTHER_BAD_PIXEL": 1 << 30,
    "REFERENCE_PIXEL": 1 << 31,
}

#: The MASK reference numbers its bits its own way and explains them in DQ_DEF, as the
#: CRDS MIRI masks do; jwst (and streamdet) translate them to the JWST values above.
#: (bit in the file, JWST flag name, description)
MASK_DQ_DEF = (
    (0, "DO_NOT_USE", "Bad pixel, do not use"),
    (1, "DEAD", "Dead pixel: no photo-response"),
    (2, "HOT", "Hot pixel: dark current far above the median"),
    (3, "WARM", "Warm pixel: dark current above the median"),
    (4, "LOW_QE", "Low quantum efficiency"),
    (5, "OTHER_BAD_PIXEL", "Random telegraph noise"),
    (6, "REFERENCE_PIXEL", "Reference pixel (no light)"),
)

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


#: EXP_TYPE written for each subarray (imaging, coronagraphy, slitless spectroscopy).
_EXP_TYPES = {
    "MASK1065": "MIR_4QPM", "MASK1140": "MIR_4QPM", "MASK1550": "MIR_4QPM",
    "MASKLYOT": "MIR_LYOT", "SLITLESSPRISM": "MIR_LRS-SLITLESS",
}
_FILTERS = {
    "MASK1065": "F1065C", "MASK1140": "F1140C", "MASK1550": "F1550C", "MASKLYOT": "F2300C",
    "SLITLESSPRISM": "P750L",
}

# ---------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------


@dataclass
class SimParams:
    """Physical and bookkeeping parameters of the simulation.

    Values are MIRI-like orders of magnitude chosen so that every effect is visible in a
    short exposure; they are not a calibration of the flight detector. DN are raw
    detector counts ("data numbers"); "linearized DN" are DN after the LINEARITY
    correction, the unit of the truth rate.
    """

    # --- bias and gain -------------------------------------------------------------
    #: Mean reset level ("pedestal") of the raw ramps, DN. MIRI's sits at 10-15 kDN, and
    #: jwst linearises raw DN *including* it (there is no superbias step for MIRI).
    pedestal_dn: float = 12500.0
    #: Pixel-to-pixel scatter of the pedestal, DN (plus a smooth gradient of the same size).
    pedestal_sigma_dn: float = 700.0
    #: Detector gain, electrons per DN (MIRI: a few e-/DN). Written as the GAIN reference
    #: and used to turn electrons into DN, so Poisson noise matches what jwst assumes.
    gain_e_per_dn: float = 5.5
    #: Relative pixel-to-pixel scatter of the gain.
    gain_sigma_frac: float = 0.03

    # --- read noise ----------------------------------------------------------------
    #: Read noise of a difference of two reads (CDS), DN, in FASTR1. This is what the
    #: READNOISE reference holds and what jwst's jump and ramp_fit assume; the simulator
    #: adds sigma = readnoise / sqrt(2) to every single read.
    readnoise_cds_fast_dn: float = 6.0
    #: The same for SLOWR1 (each pixel is sampled many times, so the noise is lower).
    readnoise_cds_slow_dn: float = 2.5
    #: Relative pixel-to-pixel scatter of the read noise.
    readnoise_sigma_frac: float = 0.05

    # --- non-linearity and saturation ----------------------------------------------
    #: MIRI ramps bend over as the pixel fills. The LINEARITY reference is
    #: L(x) = x + c2 x^2 + c3 x^3 on raw DN; this is L(x)/x - 1 at the mean saturation level
    #: (0.08: the corrected signal is 8 % above the raw one there).
    nonlinearity_at_saturation: float = 0.08
    #: Share of that non-linearity carried by the cubic term (the rest is quadratic).
    nonlinearity_cubic_share: float = 0.25
    #: Relative pixel-to-pixel scatter of c2 and c3.
    nonlinearity_sigma_frac: float = 0.10
    #: Mean SATURATION threshold, raw DN (including the pedestal).
    saturation_dn: float = 59000.0
    #: Pixel-to-pixel scatter of the saturation threshold, raw DN.
    saturation_sigma_dn: float = 600.0
    #: The physical full well lies this far above the SATURATION threshold (raw DN): the
    #: threshold is set just below the level where the ramp flattens, so a saturating
    #: pixel is always flagged.
    full_well_margin_dn: float = 1000.0

    # --- dark current and MIRI transients -----------------------------------------
    #: Mean dark current, linearized DN/s (Poisson noise included). It is in the DARK
    #: reference ramp and, averaged, in its AVDRKCUR keyword (jwst adds that to the
    #: Poisson variance).
    dark_current_dn_s: float = 0.3
    #: Amplitude (DN) of the non-linear "dark anomaly": an extra offset that builds up
    #: over the first groups as 1 - exp(-(g+1)/tau). Present in the DARK reference and
    #: in the data, so jwst's dark subtraction removes it. Integration 1 has this
    #: amplitude, later integrations ``dark_anomaly_int2_factor`` times it.
    dark_anomaly_dn: float = 25.0
    dark_anomaly_tau_groups: float = 3.0
    dark_anomaly_int2_factor: float = 1.6
    #: Amplitude (raw DN) of the reset transient: an offset decaying as exp(-g/tau) from
    #: the start of each integration (the reset FETs settle slowly). It is the RESET
    #: reference, which jwst subtracts per integration and group before linearity.
    reset_anomaly_dn: float = 120.0
    reset_tau_groups: float = 1.5
    #: Integrations after the first have a weaker reset transient (this factor).
    reset_int2_factor: float = 0.6
    #: Number of groups the RESET reference covers (jwst corrects only those).
    reset_ngroups: int = 15
    #: Groups jwst's rscd step flags DO_NOT_USE at the start of integration 1 and of
    #: later integrations (written to the RSCD reference for every subarray/read pattern).
    rscd_skip_int1: int = 1
    rscd_skip_int2p: int = 3
    #: RSCD ("reset switch charge decay") transient in integrations >= 2, DN: an offset
    #: decaying over the flagged first groups, and zero from the first unflagged group on
    #: (jwst 3 no longer corrects RSCD, it only flags those groups).
    rscd_anomaly_dn: float = 60.0
    #: Decay of the RSCD transient, groups.
    rscd_tau_groups: float = 1.5
    #: Offset (DN) of the final group of every integration (MIRI's "last frame effect");
    #: jwst's lastframe step flags that group DO_NOT_USE when NGROUPS > 2.
    last_frame_offset_dn: float = -20.0
    #: Full frame only: per-amplifier (column mod 4) and row-parity offsets that wander
    #: from group to group (random walk with this step, DN) and are the same in the
    #: reference columns; jwst's refpix removes them for full frame. (jwst skips refpix
    #: for MIRI subarrays, so subarrays carry no drift.)
    amplifier_drift_step_dn: float = 2.0

    # --- bad pixels (fractions of the light-sensitive pixels of the full frame) -------
    dead_fraction: float = 5e-4  #: DEAD | DO_NOT_USE: no photo-response
    hot_fraction: float = 1e-3  #: HOT | DO_NOT_USE: extra current ``hot_rate_dn_s``
    warm_fraction: float = 1e-3  #: WARM only (still used): extra ``warm_rate_dn_s``
    low_qe_fraction: float = 5e-4  #: LOW_QE only (still used): response times ``low_qe_factor``
    telegraph_fraction: float = 5e-4  #: OTHER_BAD_PIXEL | DO_NOT_USE: random telegraph noise
    unreliable_dark_fraction: float = 3e-4  #: UNRELIABLE_DARK in the DARK reference DQ
    #: Extra current of hot and warm pixels, linearized DN/s (log-uniform in the range).
    hot_rate_dn_s: tuple[float, float] = (50.0, 2000.0)
    warm_rate_dn_s: tuple[float, float] = (1.0, 5.0)
    low_qe_factor: float = 0.5
    #: Random-telegraph pixels jump between two levels this far apart (DN), switching
    #: with probability ``telegraph_switch_prob`` per group.
    telegraph_amplitude_dn: float = 80.0
    telegraph_switch_prob: float = 0.15
    #: Pixels of the full frame whose LINEARITY coefficients are NaN (jwst: no
    #: correction, NO_LIN_CORR) and whose SATURATION threshold is NaN (jwst: NO_SAT_CHECK).
    #: The simulated data of those pixels are linear / never clipped accordingly.
    n_no_lin_corr: int = 40
    n_no_sat_check: int = 20

    # --- scene -----------------------------------------------------------------------
    #: Sky (zodiacal + telescope) background, linearized DN/s, the same in every
    #: light-sensitive pixel apart from a +-``sky_gradient_frac`` ramp across the frame.
    sky_dn_s: float = 20.0
    sky_gradient_frac: float = 0.05
    #: Gaussian PSF sigma, pixels (MIRI F770W: FWHM ~0.27" ~ 2.4 pixels of 0.11").
    psf_sigma_pix: float = 1.0
    #: The named sources are specified by how far their peak pixel fills the
    #: linear range (saturation - pedestal) by the last group, so every subarray and
    #: ramp length shows the same behaviour. The saturating source crosses the
    #: SATURATION threshold at this fraction of the ramp (0.5: half-way up).
    saturating_source_at: float = 0.5
    bright_source_fill: float = 0.5
    medium_source_fill: float = 0.08
    faint_source_fill: float = 0.01
    #: Further random point sources per 10 000 pixels, peak fill log-uniform in
    #: ``random_source_fill``.
    random_sources_per_10k_pix: float = 4.0
    random_source_fill: tuple[float, float] = (0.002, 0.2)

    # --- cosmic rays -----------------------------------------------------------------
    #: Primary cosmic-ray hits per cm^2 per second (galactic cosmic rays near L2: ~5).
    cosmic_ray_rate_cm2_s: float = 5.0
    #: MIRI pixel pitch, micrometres (sets the hit rate per pixel).
    pixel_pitch_um: float = 25.0
    #: At least this many primary hits per integration, so that short subarray ramps
    #: still exercise jump detection (a test convenience, not physics).
    min_cosmic_rays_per_int: int = 30
    #: Hit amplitudes are log-uniform between these multiples of the pixel's noise on a
    #: group difference (sigma^2 = readnoise^2 + rate * tgroup / gain): from invisible to
    #: > 1000 sigma (jwst flags the 4 neighbours of 10-1000 sigma jumps).
    cosmic_ray_sigma_range: tuple[float, float] = (2.0, 5000.0)
    #: Fraction of a hit's charge that also lands in each of its 4 neighbours (charge
    #: diffusion); those deposits are listed in the catalogue as secondary jumps.
    cosmic_ray_neighbor_fraction: float = 0.02

    # --- large cosmic-ray events; off by default ---------------------------------------
    #: MIRI showers per integration (Poisson mean): faint charge from secondaries spread
    #: over a disk tens of pixels across, all arriving in one group (jwst's
    #: ``find_showers`` looks for them). Zero: none, and the outputs are byte-identical
    #: to those of a simulator without large events.
    showers_per_int: float = 0.0
    #: Shower radius, pixels (uniform in this range).
    shower_radius_px: tuple[float, float] = (8.0, 25.0)
    #: Shower charge per pixel at its centre, in multiples of the pixel's noise on a group
    #: difference (uniform in this range): too faint for the two-point search alone. It
    #: falls off as 1 - 0.5 (r/R)^2 to the edge.
    shower_sigma_range: tuple[float, float] = (1.5, 4.0)
    #: Snowballs per integration (Poisson mean): a bright core that saturates within its
    #: group, ringed by a fainter halo (jwst's ``expand_large_events``).
    snowballs_per_int: float = 0.0
    #: Radius of the saturating core, pixels (uniform): cores 5-12 px across.
    snowball_core_radius_px: tuple[float, float] = (2.5, 6.0)
    #: Charge in the core, as a fraction of the pixel's linear range (> 1 saturates).
    snowball_core_fill: float = 1.5
    #: The halo reaches this many core radii, with this fraction of the core's charge.
    snowball_halo_radii: float = 2.0
    snowball_halo_fraction: float = 0.02

    # --- observation and bookkeeping ------------------------------------------------
    #: FILTER keyword (imaging subarrays); coronagraph and LRS subarrays get theirs.
    filter: str = "F770W"
    #: DATE-OBS / TIME-OBS (UTC) of the exposure start.
    date_obs: str = "2024-03-01"
    time_obs: str = "12:00:00.000"
    #: Pointing of the reference pixel (deg) and V3 position angle (deg).
    target_ra: float = 80.4875
    target_dec: float = -69.4986
    pa_v3: float = 250.0
    #: Write mask/saturation/linearity/gain/readnoise as full-frame (1032 x 1024)
    #: references that the steps cut to the subarray, as CRDS ships them. False writes
    #: them at the subarray size instead (smaller and faster for tiny cases).
    fullframe_refs: bool = True
    #: CRDS step-parameter references to ship in the cache, as operations do: jwst step
    #: class name -> the parameters its ``pars-<class>`` file sets, e.g.
    #: ``{"JumpStep": {"rejection_threshold": 3.0}}`` (``"Detector1Pipeline"`` may hold a
    #: ``"steps"`` mapping). Written as stpipe ASDF parameter files selected by an rmap;
    #: every other pars type stays N/A. Empty (the default): none, and the outputs are
    #: those of a simulator without this option.
    crds_pars: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    # --- electromagnetic interference (EMI); off by default ----------------------------
    #: MIRI's readout electronics pick up sinusoidal interference (390.625 Hz in most
    #: subarrays, a ~10.04 Hz line everywhere; jwst's ``emicorr`` step removes it). Each
    #: frequency f (Hz) adds ``A sin(2 pi f t + phi)`` raw DN to every read, where t (s) is
    #: the time the pixel is read on the 10 us pixel clock (:func:`emi_read_clocks`: the
    #: four amplifiers read columns 4k..4k+3 together, rows follow each other every "row
    #: clocks", frames every "frame clocks", and one reset frame separates integrations),
    #: counted from the first read of the exposure. Empty: no EMI, and the outputs are
    #: byte-identical to those of a simulator without EMI support.
    emi_frequencies_hz: tuple[float, ...] = ()
    #: Semi-amplitude A of each frequency, raw DN (same length as ``emi_frequencies_hz``).
    emi_amplitudes_dn: tuple[float, ...] = ()
    #: Phase phi of each frequency at the first read of the exposure, radians (entries
    #: left out are 0).
    emi_phases_rad: tuple[float, ...] = ()

    @property
    def has_emi(self) -> bool:
        return bool(self.emi_frequencies_hz or self.emi_amplitudes_dn or self.emi_phases_rad)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (tuples become lists). The EMI fields appear only when EMI
        is injected, so that EMI-free outputs (file names included) stay as they were."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        if not self.has_emi:
            for key in _EMI_FIELDS:
                out.pop(key, None)
        if not self.crds_pars:
            out.pop("crds_pars", None)
        if not self.has_large_events:
            for key in _LARGE_EVENT_FIELDS:
                out.pop(key, None)
        return out

    @property
    def has_large_events(self) -> bool:
        return self.showers_per_int > 0 or self.snowballs_per_int > 0


_EMI_FIELDS = ("emi_frequencies_hz", "emi_amplitudes_dn", "emi_phases_rad")
_LARGE_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(SimParams)
                            if f.name.startswith(("shower", "snowball")))
#: what ``simulate(large_events=True)`` sets when the params leave both rates at zero
LARGE_EVENT_RATES = {"showers_per_int": 2.0, "snowballs_per_int": 1.0}


# ---------------------------------------------------------------------------------------
# Results, errors, environment
# ---------------------------------------------------------------------------------------


class SimulationError(ValueError):
    """Bad arguments to :func:`simulate` (the message is one line)."""


@dataclass
class SimResult:
    """What :func:`simulate` wrote."""

    uncal: Path  #: the Level 1B exposure
    refs: dict[str, Path]  #: reference type -> file under ``refs/``
    crds_path: Path  #: root of the CRDS cache (CRDS_PATH)
    context: str  #: the .pmap that resolves this exposure (CRDS_CONTEXT)
    truth_rate: Path  #: 2-D FITS of the true rate, linearized DN/s
    truth_catalog: Path  #: JSON catalogue of injected effects
    env: dict[str, str] = field(default_factory=dict)  #: CRDS_* variables for this cache
    outdir: Path | None = None
    name: str = ""

    def shell_exports(self) -> str:
        """``export CRDS_PATH=... CRDS_CONTEXT=...`` for a POSIX shell."""
        return "export " + " ".join(f"{k}={_shell_quote(v)}" for k, v in self.env.items())


def _shell_quote(value: str) -> str:
    if value and all(c.isalnum() or c in "/._-:+=@%," for c in value):
        return value
    return "'" + value.replace("'", "'\"'\"'") + "'"


#: crds treats any server URL containing "serverless" as "never connect" (no socket).
SERVERLESS_URL = "https://jwst-serverless-mode.stsci.edu"


def crds_env(crds_path: str | os.PathLike, context: str) -> dict[str, str]:
    """Environment variables that make the ``crds`` client (and jwst) use this cache only.

    They must be in ``os.environ`` before ``crds`` is first imported in a process (crds
    reads the server URL at import), so run jwst in a subprocess with them.
    """
    return {
        "CRDS_PATH": str(Path(crds_path).resolve()),
        "CRDS_CONTEXT": context,
        "CRDS_SERVER_URL": SERVERLESS_URL,
        "CRDS_MODE": "local",
        "CRDS_OBSERVATORY": "jwst",
        "CRDS_READONLY_CACHE": "1",
        "CRDS_CLIENT_RETRY_COUNT": "1",
        "CRDS_CLIENT_TIMEOUT_SECONDS": "5",
    }


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


_RNG_STREAMS = ("detector", "scene", "cosmic", "ramps")


def _rng_streams(seed: int) -> dict[str, np.random.Generator]:
    """Independent random streams, each a fixed child of the seed."""
    names = _RNG_STREAMS
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: np.random.Generator(np.random.PCG64(c)) for n, c in zip(names, children)}


def _rscd_effective_skip(ngroups: int, nints: int, skip1: int, skip2p: int) -> tuple[int, int]:
    """Groups jwst 3.0's rscd step actually flags (int 1, ints >= 2), given the table values."""
    if ngroups < 3:
        return 0, 0
    if ngroups <= 5:
        skip1 = skip2p = 1
    if ngroups < skip1 + 3:
        skip1 = max(0, ngroups - 3)
    if nints > 1 and ngroups < skip2p + 3:
        skip2p = max(0, ngroups - 3)
    return skip1, skip2p


def _pixel_psf_1d(n: int, center: float, sigma: float) -> np.ndarray:
    """Fraction of a 1-D Gaussian falling in each pixel 0..n-1 (pixel i spans i +- 0.5)."""
    edges = (np.arange(n + 1, dtype=np.float64) - 0.5 - center) / (math.sqrt(2.0) * sigma)
    cdf = 0.5 * (1.0 + np.array([math.erf(e) for e in edges]))
    return np.diff(cdf)


def _horner(coeffs: list[np.ndarray], x: np.ndarray) -> np.ndarray:
    out = np.array(coeffs[-1], dtype=np.float64, copy=True)
    for c in coeffs[-2::-1]:
        out *= x
        out += c
    return out


def _newton_cubic(x, y, c2, c3, c2x2, c3x3, t, fp, max_iter=8, tol=0.01) -> None:
    """Solve x (1 + x (c2 + c3 x)) = y for x, in place (float32 buffers ``t`` and ``fp``).

    On return ``fp`` holds dL/dx at the last iterate, which the caller uses to warm-start
    the next group. ``tol`` is in DN (float32 resolves ~0.004 DN at 60 kDN).
    """
    for _ in range(max_iter):
        np.multiply(c3, x, out=t)
        t += c2
        t *= x
        t += 1.0
        t *= x
        t -= y  # L(x) - y
        np.multiply(c3x3, x, out=fp)
        fp += c2x2
        fp *= x
        fp += 1.0  # L'(x)
        t /= fp
        x -= t
        if max(float(t.max()), -float(t.min())) < tol:
            break


def _raw_to_fits_int16(plane_u16: np.ndarray) -> np.ndarray:
    """uint16 values -> the big-endian int16 that FITS stores with BZERO = 32768."""
    return (plane_u16 ^ np.uint16(0x8000)).astype(">u2").view(">i2")


def _float_to_fits(plane: np.ndarray) -> np.ndarray:
    return np.asarray(plane, dtype=">f4")


def _image_header(extname: str, bitpix: int, shape: tuple[int, ...], bzero: int | None = None
                  ) -> fits.Header:
    """An IMAGE extension header for ``shape`` (numpy order) to be streamed."""
    hdr = fits.Header()
    hdr["XTENSION"] = ("IMAGE", "Image extension")
    hdr["BITPIX"] = bitpix
    hdr["NAXIS"] = len(shape)
    for i, n in enumerate(reversed(shape), start=1):
        hdr[f"NAXIS{i}"] = n
    hdr["PCOUNT"] = 0
    hdr["GCOUNT"] = 1
    if bzero is not None:
        hdr["BSCALE"] = 1
        hdr["BZERO"] = bzero
    hdr["EXTNAME"] = (extname, "extension name")
    return hdr


def _stream_image(path: Path, header: fits.Header, planes: Iterator[np.ndarray]) -> None:
    """Append an IMAGE extension to ``path``, writing its data plane by plane."""
    shdu = fits.StreamingHDU(str(path), header)
    try:
        for plane in planes:
            shdu.write(np.ascontiguousarray(plane))
    finally:
        shdu.close()


def _append_hdus(path: Path, hdus: list) -> None:
    """Append extensions to an existing FITS file without reading its data."""
    with fits.open(path, mode="append") as hdul:
        for hdu in hdus:
            hdul.append(hdu)


def _asdf_hdu() -> fits.BinTableHDU:
    """A minimal embedded-ASDF extension (what stdatamodels writes as ``ASDF``).

    jwst's ``Step.call(filename)`` reads the metadata through that extension and fails
    without it; with an (almost) empty tree the metadata come from the FITS keywords.
    The bytes are a complete ASDF 1.5 file written by hand, so no asdf package is needed.
    """
    text = (
        "#ASDF 1.0.0\n"
        "#ASDF_STANDARD 1.5.0\n"
        "%YAML 1.1\n"
        "%TAG ! tag:stsci.edu:asdf/\n"
        "--- !core/asdf-1.1.0\n"
        "asdf_library: !core/software-1.0.0 {author: streamdet, name: streamdet.simulate,\n"
        "  version: 0.1.0}\n"
        "...\n"
    )
    data = np.frombuffer(text.encode("ascii"), dtype=np.uint8)[None, :]
    column = fits.Column(name="ASDF_METADATA", format=f"{data.shape[1]}B", array=data)
    return fits.BinTableHDU.from_columns([column], name="ASDF")


def _dq_def_hdu(rows) -> fits.BinTableHDU:
    """DQ_DEF table from (bit, name, description) rows."""
    bits = np.array([r[0] for r in rows], dtype=np.int32)
    return fits.BinTableHDU.from_columns(
        [
            fits.Column("BIT", "J", array=bits),
            fits.Column("VALUE", "J", bzero=2**31, array=(np.uint32(1) << bits.astype(np.uint32))),
            fits.Column("NAME", "40A", array=np.array([r[1] for r in rows])),
            fits.Column("DESCRIPTION", "80A", array=np.array([r[2] for r in rows])),
        ],
        name="DQ_DEF",
    )


def _standard_dq_def(names: list[str]) -> fits.BinTableHDU:
    rows = []
    for n in names:
        bit = int(DQ[n]).bit_length() - 1
        rows.append((bit, n, n.replace("_", " ").capitalize()))
    return _dq_def_hdu(rows)


# ---------------------------------------------------------------------------------------
# The detector and the scene
# ---------------------------------------------------------------------------------------


@dataclass
class _Detector:
    """Full-frame detector properties (float64 unless noted)."""

    pedestal: np.ndarray
    gain: np.ndarray
    rn_fast: np.ndarray
    rn_slow: np.ndarray
    c2: np.ndarray
    c3: np.ndarray
    sat: np.ndarray
    dark_rate: np.ndarray
    dark_amp: np.ndarray  # relative amplitude of the dark anomaly
    reset_amp: np.ndarray  # relative amplitude of the reset transient
    rscd_amp: np.ndarray  # relative amplitude of the RSCD transient
    refcol: np.ndarray  # bool (1032,) reference columns
    mask_bits: np.ndarray  # uint32 JWST DQ values of the MASK reference
    extra_rate: np.ndarray  # hot/warm extra current, DN/s
    qe: np.ndarray  # relative response (0 dead, low_qe_factor, 1)
    telegraph: np.ndarray  # bool
    no_lin: np.ndarray  # bool
    no_sat: np.ndarray  # bool
    unreliable_dark: np.ndarray  # bool


def _make_detector(p: SimParams, rng: np.random.Generator) -> _Detector:
    ny, nx = FULL_SHAPE
    shape = FULL_SHAPE

    def normal():
        return rng.standard_normal(shape, dtype=np.float32).astype(np.float64)

    yy = np.linspace(-1.0, 1.0, ny)[:, None]
    xx = np.linspace(-1.0, 1.0, nx)[None, :]
    pedestal = p.pedestal_dn + p.pedestal_sigma_dn * (normal() + 0.6 * xx - 0.4 * yy)
    gain = p.gain_e_per_dn * (1.0 + p.gain_sigma_frac * normal())
    rn_pattern = np.clip(1.0 + p.readnoise_sigma_frac * normal(), 0.5, None)
    # Non-linearity: L(x)/x - 1 = a x + b x^2 reaches ``nonlinearity_at_saturation`` at the
    # mean saturation level, ``cubic_share`` of it from b.
    s = p.saturation_dn
    frac = p.nonlinearity_at_saturation
    a0 = (1.0 - p.nonlinearity_cubic_share) * frac / s
    b0 = p.nonlinearity_cubic_share * frac / s**2
    c2 = a0 * np.clip(1.0 + p.nonlinearity_sigma_frac * normal(), 0.2, None)
    c3 = b0 * np.clip(1.0 + p.nonlinearity_sigma_frac * normal(), 0.2, None)
    sat = p.saturation_dn + p.saturation_sigma_dn * normal()
    dark_rate = p.dark_current_dn_s * np.clip(1.0 + 0.2 * normal(), 0.0, None)
    dark_amp = np.clip(1.0 + 0.2 * normal(), 0.0, None)
    reset_amp = np.clip(1.0 + 0.2 * normal(), 0.0, None)
    rscd_amp = np.clip(1.0 + 0.2 * normal(), 0.0, None)

    refcol = np.zeros(nx, dtype=bool)
    refcol[:N_REF_COLUMNS] = True
    refcol[-N_REF_COLUMNS:] = True
    # Reference columns see no light and have no dark current (their values after the
    # dark subtraction must stay flat for jwst's refpix to measure the drift).
    dark_rate[:, refcol] = 0.0
    dark_amp[:, refcol] = 0.0

    mask_bits = np.zeros(shape, dtype=np.uint32)
    mask_bits[:, refcol] = DQ["REFERENCE_PIXEL"]
    extra_rate = np.zeros(shape)
    qe = np.ones(shape)
    qe[:, refcol] = 0.0
    telegraph = np.zeros(shape, dtype=bool)
    no_lin = np.zeros(shape, dtype=bool)
    no_sat = np.zeros(shape, dtype=bool)
    unreliable_dark = np.zeros(shape, dtype=bool)

    # Bad pixels: disjoint random sets among the light-sensitive pixels.
    light = np.flatnonzero(~np.broadcast_to(refcol, shape).ravel())
    counts = {
        "dead": round(p.dead_fraction * light.size),
        "hot": round(p.hot_fraction * light.size),
        "warm": round(p.warm_fraction * light.size),
        "low_qe": round(p.low_qe_fraction * light.size),
        "telegraph": round(p.telegraph_fraction * light.size),
        "no_lin": int(p.n_no_lin_corr),
        "no_sat": int(p.n_no_sat_check),
    }
    total = sum(counts.values())
    picked = light[rng.choice(light.size, size=total, replace=False)]
    start = 0
    sets = {}
    for key, n in counts.items():
        sets[key] = picked[start:start + n]
        start += n
    flat = lambda a: a.reshape(-1)  # noqa: E731 - views of the 2-D maps
    flat(mask_bits)[sets["dead"]] |= DQ["DEAD"] | DQ["DO_NOT_USE"]
    flat(qe)[sets["dead"]] = 0.0
    flat(mask_bits)[sets["hot"]] |= DQ["HOT"] | DQ["DO_NOT_USE"]
    lo, hi = p.hot_rate_dn_s
    flat(extra_rate)[sets["hot"]] = np.exp(rng.uniform(np.log(lo), np.log(hi), sets["hot"].size))
    flat(mask_bits)[sets["warm"]] |= DQ["WARM"]
    lo, hi = p.warm_rate_dn_s
    flat(extra_rate)[sets["warm"]] = np.exp(rng.uniform(np.log(lo), np.log(hi), sets["warm"].size))
    flat(mask_bits)[sets["low_qe"]] |= DQ["LOW_QE"]
    flat(qe)[sets["low_qe"]] = p.low_qe_factor
    flat(mask_bits)[sets["telegraph"]] |= DQ["OTHER_BAD_PIXEL"] | DQ["DO_NOT_USE"]
    flat(telegraph)[sets["telegraph"]] = True
    flat(no_lin)[sets["no_lin"]] = True
    flat(no_sat)[sets["no_sat"]] = True
    # Unreliable-dark flags may fall on any light-sensitive pixel (overlaps allowed).
    n_ud = round(p.unreliable_dark_fraction * light.size)
    flat(unreliable_dark)[light[rng.choice(light.size, size=n_ud, replace=False)]] = True

    return _Detector(
        pedestal=pedestal, gain=gain,
        rn_fast=p.readnoise_cds_fast_dn * rn_pattern, rn_slow=p.readnoise_cds_slow_dn * rn_pattern,
        c2=c2, c3=c3, sat=sat, dark_rate=dark_rate, dark_amp=dark_amp, reset_amp=reset_amp,
        rscd_amp=rscd_amp, refcol=refcol, mask_bits=mask_bits, extra_rate=extra_rate, qe=qe,
        telegraph=telegraph, no_lin=no_lin, no_sat=no_sat, unreliable_dark=unreliable_dark,
    )


def _make_scene(p: SimParams, sub: Subarray, det: _Detector, t_ramp: float,
                rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """Sky + point sources in the subarray (DN/s, before QE and bad pixels)."""
    ny, nx = sub.shape
    ys, xs = sub.full_frame_slices
    refcol = det.refcol[xs]
    light_x = np.flatnonzero(~refcol)
    x_lo, x_hi = float(light_x[0]), float(light_x[-1])

    gx = np.linspace(-1.0, 1.0, FULL_SHAPE[1])[xs][None, :]
    gy = np.linspace(-1.0, 1.0, FULL_SHAPE[0])[ys][:, None]
    sky = p.sky_dn_s * (1.0 + p.sky_gradient_frac * 0.5 * (gx + gy))
    scene = np.broadcast_to(sky, (ny, nx)).copy()

    # Linear dynamic range (linearized DN) between the mean pedestal and saturation.
    s = p.saturation_dn
    frac = p.nonlinearity_at_saturation
    lin_sat = s * (1.0 + frac)
    linear_range = lin_sat - p.pedestal_dn
    sources: list[dict] = []

    def add_source(kind, yc, xc, peak_rate):
        sigma = p.psf_sigma_pix
        half = int(math.ceil(6 * sigma)) + 1
        y0, y1 = max(0, int(yc) - half), min(ny, int(yc) + half + 2)
        x0, x1 = max(0, int(xc) - half), min(nx, int(xc) + half + 2)
        py = _pixel_psf_1d(y1 - y0, yc - y0, sigma)
        px = _pixel_psf_1d(x1 - x0, xc - x0, sigma)
        stamp = np.outer(py, px)
        peak_frac = float(stamp.max())
        if peak_frac <= 0:
            return
        total = peak_rate / peak_frac
        scene[y0:y1, x0:x1] += total * stamp
        sources.append({
            "id": len(sources), "kind": kind, "y": round(yc, 4), "x": round(xc, 4),
            "peak_rate_dn_s": round(peak_rate, 4), "total_rate_dn_s": round(total, 4),
        })

    def place(fy, fx):
        yc = fy * (ny - 1) + rng.uniform(-0.5, 0.5)
        xc = x_lo + fx * (x_hi - x_lo) + rng.uniform(-0.5, 0.5)
        return min(max(yc, 0.0), ny - 1.0), min(max(xc, x_lo), x_hi)

    mean_sky = p.sky_dn_s
    sat_rate = linear_range / (max(p.saturating_source_at, 1e-3) * t_ramp) - mean_sky
    add_source("saturating", *place(0.5, 0.5), max(sat_rate, 0.0))
    add_source("bright", *place(0.22, 0.25), p.bright_source_fill * linear_range / t_ramp)
    add_source("medium", *place(0.78, 0.75), p.medium_source_fill * linear_range / t_ramp)
    add_source("faint", *place(0.25, 0.78), p.faint_source_fill * linear_range / t_ramp)
    n_random = int(rng.poisson(p.random_sources_per_10k_pix * ny * nx / 1e4))
    lo, hi = p.random_source_fill
    for _ in range(n_random):
        fill = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        add_source("random", *place(rng.uniform(0, 1), rng.uniform(0, 1)), fill * linear_range / t_ramp)

    scene[:, refcol] = 0.0
    return scene, sources


# ---------------------------------------------------------------------------------------
# The exposure model: one object holding everything the ramps and references share
# ---------------------------------------------------------------------------------------


class _Model:
    def __init__(self, p: SimParams, sub: Subarray, ngroups: int, nints: int, readpatt: str,
                 seed: int):
        self.p, self.sub, self.ngroups, self.nints, self.readpatt = p, sub, ngroups, nints, readpatt
        self.tframe = sub.frame_time(readpatt)
        self.tgroup = self.tframe  # NFRAMES = 1, GROUPGAP = 0
        self.t = (np.arange(ngroups) + 1.0) * self.tgroup  # time of each read since reset
        self.rngs = _rng_streams(seed)
        self.seed = seed
        self.det = _make_detector(p, self.rngs["detector"])
        ys, xs = sub.full_frame_slices
        self.ys, self.xs = ys, xs
        det = self.det
        cut = lambda a: np.ascontiguousarray(a[ys, xs])  # noqa: E731
        self.ped = cut(det.pedestal)
        self.gain = cut(det.gain)
        self.rn = cut(det.rn_slow if readpatt == "SLOWR1" else det.rn_fast)
        self.sat = cut(det.sat)
        self.sat_ref = np.where(cut(det.no_sat), np.nan, self.sat).astype(np.float32)
        no_lin = cut(det.no_lin)
        self.no_lin = no_lin
        self.c2 = np.where(no_lin, 0.0, cut(det.c2))
        self.c3 = np.where(no_lin, 0.0, cut(det.c3))
        self.dark_rate = cut(det.dark_rate)
        self.dark_amp = cut(det.dark_amp)
        self.reset_amp = cut(det.reset_amp)
        self.rscd_amp = cut(det.rscd_amp)
        self.refcol = det.refcol[xs]
        self.mask_bits = cut(det.mask_bits)
        self.telegraph = cut(det.telegraph)
        self.qe = cut(det.qe)
        self.extra_rate = cut(det.extra_rate)
        self.unreliable_dark = cut(det.unreliable_dark)
        self.shape = sub.shape

        # Float32 coefficient planes exactly as they go into the LINEARITY file: the ramps
        # invert L(x) = x + c2 x^2 + c3 x^3 with these numbers (identity where no_lin).
        self.c2_32 = self.c2.astype(np.float32)
        self.c3_32 = self.c3.astype(np.float32)
        self.lin_coeffs = [np.zeros(self.shape), np.ones(self.shape),
                           self.c2_32.astype(np.float64), self.c3_32.astype(np.float64)]
        # Raw DN where the pixel stops responding, and its linearized value.
        self.full_well = np.where(np.isnan(self.sat_ref), 65535.0 - 1000.0,
                                  self.sat + p.full_well_margin_dn)
        self.full_well_lin = _horner(self.lin_coeffs, self.full_well)

        t_ramp = float(self.t[-1])
        self.scene, self.sources = _make_scene(p, sub, det, t_ramp, self.rngs["scene"])
        # The truth: the slope of the linearized, dark-subtracted ramp.
        self.truth = self.scene * self.qe + self.extra_rate
        self.truth[:, self.refcol] = 0.0
        # Charge rate (electrons/s): signal + dark current.
        self.e_rate = (self.truth + self.dark_rate) * self.gain
        # Noise of one group difference as jwst's jump step estimates it (DN).
        self.diff_sigma = np.sqrt(self.rn**2 + (self.truth + self.dark_rate) * self.tgroup / self.gain)

        self.skip1, self.skip2p = _rscd_effective_skip(ngroups, nints, p.rscd_skip_int1,
                                                       p.rscd_skip_int2p)
        self.ndark = 2 if nints >= 2 else 1
        self.nreset = 2 if nints >= 2 else 1
        self.reset_ngroups = max(1, min(ngroups, int(p.reset_ngroups)))
        self.is_full = sub.name == "FULL"
        self._make_drift()
        self._make_cosmic_rays()
        self._make_emi()

    # --- deterministic reference planes (used by the refs AND the ramps) --------------
    def dark_anomaly_scale(self, i_dark: int, g: int) -> float:
        """Dark anomaly of group ``g`` (DN) for a pixel of relative amplitude 1."""
        p = self.p
        amp = p.dark_anomaly_dn * (1.0 if i_dark == 0 else p.dark_anomaly_int2_factor)
        return amp * (1.0 - math.exp(-(g + 1) / p.dark_anomaly_tau_groups))

    def dark_plane(self, i_dark: int, g: int) -> np.ndarray:
        """DARK reference plane (float32): mean dark charge + dark anomaly."""
        f32 = np.float32
        plane = self.dark_rate.astype(f32) * f32(self.t[g])
        plane += self.dark_amp.astype(f32) * f32(self.dark_anomaly_scale(i_dark, g))
        return plane

    def reset_scale(self, i_reset: int, g: int) -> float:
        """Reset transient of group ``g`` (raw DN) for a pixel of relative amplitude 1."""
        p = self.p
        amp = p.reset_anomaly_dn * (1.0 if i_reset == 0 else p.reset_int2_factor)
        return amp * math.exp(-g / p.reset_tau_groups)

    def reset_plane(self, i_reset: int, g: int) -> np.ndarray:
        """RESET reference plane (float32, raw DN); the ramps add exactly these numbers."""
        return self.reset_amp.astype(np.float32) * np.float32(self.reset_scale(i_reset, g))

    # --- amplifier drift (FULL only) -------------------------------------------------
    def _make_drift(self):
        rng = self.rngs["cosmic"]  # drawn before the cosmic rays, fixed order
        self.drift = None
        if not self.is_full or self.p.amplifier_drift_step_dn <= 0:
            return
        steps = rng.normal(0.0, self.p.amplifier_drift_step_dn, (self.nints, self.ngroups, 2, 4))
        offsets = rng.normal(0.0, 3 * self.p.amplifier_drift_step_dn, (self.nints, 1, 2, 4))
        self.drift = np.cumsum(steps, axis=1) + offsets  # [int, group, row parity, amp]
        # Index of each pixel into the 8 (row parity, amplifier) values of a group.
        rows = np.arange(self.shape[0]) % 2
        cols = np.arange(self.shape[1]) % 4
        self._drift_index = (rows[:, None] * 4 + cols[None, :]).astype(np.intp)

    def drift_plane(self, i: int, g: int) -> np.ndarray | float:
        """Amplifier drift added to group ``g`` of integration ``i`` (DN); 0 off FULL."""
        if self.drift is None:
            return 0.0
        return np.take(self.drift[i, g].reshape(8).astype(np.float32), self._drift_index)

    # --- electromagnetic interference ----------------------------------------------------
    def _make_emi(self):
        """EMI terms (frequency Hz, amplitude DN, phase rad) and the read clocks they need."""
        p = self.p
        self.emi_terms = [
            (float(f), float(a), float(p.emi_phases_rad[k]) if k < len(p.emi_phases_rad) else 0.0)
            for k, (f, a) in enumerate(zip(p.emi_frequencies_hz, p.emi_amplitudes_dn))]
        self.emi_clocks = None
        if self.emi_terms:
            self.emi_clocks = emi_read_clocks(self.sub.name, self.readpatt, self.ngroups)

    def emi_plane(self, i: int, g: int) -> np.ndarray:
        """EMI (raw DN, float64) added to every read of group ``g`` of integration ``i``."""
        spatial, frame, integration = self.emi_clocks
        offset = i * integration + g * frame  # clocks from the first read to this frame
        out = np.zeros(self.shape)
        for freq, amp, phase in self.emi_terms:
            cycles_per_clock = freq * EMI_PIXEL_CLOCK_S
            # whole cycles of the frame offset dropped first, so the phase keeps its digits
            base = math.fmod(offset * cycles_per_clock, 1.0)
            out += amp * np.sin(2.0 * math.pi * (spatial * cycles_per_clock + base) + phase)
        return out

    # --- cosmic rays ---------------------------------------------------------------------
    def _make_cosmic_rays(self):
        p, rng = self.p, self.rngs["cosmic"]
        ny, nx = self.shape
        light_cols = np.flatnonzero(~self.refcol)
        n_light = ny * light_cols.size
        area_cm2 = (p.pixel_pitch_um * 1e-4) ** 2
        t_int = float(self.t[-1])
        lo, hi = p.cosmic_ray_sigma_range
        self.cr_events: list[list[tuple[int, int, int, float, bool, int]]] = []
        self.jumps: list[dict] = []
        if self.ngroups < 2:
            self.cr_events = [[] for _ in range(self.nints)]
            return
        for i in range(self.nints):
            n = int(rng.poisson(p.cosmic_ray_rate_cm2_s * area_cm2 * n_light * t_int))
            n = max(n, int(p.min_cosmic_rays_per_int))
            ys = rng.integers(0, ny, n)
            xs = light_cols[rng.integers(0, light_cols.size, n)]
            gs = rng.integers(1, self.ngroups, n)
            levels = np.exp(rng.uniform(math.log(lo), math.log(hi), n))
            events = []
            for y, x, g, lev in zip(ys.tolist(), xs.tolist(), gs.tolist(), levels.tolist()):
                amp = lev * float(self.diff_sigma[y, x])
                parent = len(self.jumps)
                self._add_jump(events, i, g, y, x, amp, True, parent)
                if p.cosmic_ray_neighbor_fraction > 0:
                    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < ny and 0 <= xx < nx and not self.refcol[xx]:
                            self._add_jump(events, i, g, yy, xx,
                                           amp * p.cosmic_ray_neighbor_fraction, False, parent)
            if p.has_large_events:
                self._add_large_events(events, i)
            events.sort(key=lambda e: e[0])
            self.cr_events.append(events)

    def _add_large_events(self, events, i):
        """Showers and snowballs of integration ``i``, from their own random stream (so
        the other effects stay as they are), listed in ``self.large_events``; their
        pixel deposits join the integration's events without a catalogue entry."""
        p = self.p
        if not hasattr(self, "large_rng"):
            self.large_rng = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence(self.seed).spawn(len(_RNG_STREAMS) + 1)[-1]))
            self.large_events = []
        rng = self.large_rng
        ny, nx = self.shape
        linear_range = np.maximum(np.nan_to_num(self.sat_ref, nan=60000.0) - self.ped, 1000.0)

        def deposit(kind, g, yc, xc, radius, amplitude_of):
            y0, y1 = max(0, int(math.floor(yc - radius))), min(ny, int(math.ceil(yc + radius)) + 1)
            x0, x1 = max(0, int(math.floor(xc - radius))), min(nx, int(math.ceil(xc + radius)) + 1)
            yy, xx = np.mgrid[y0:y1, x0:x1]
            r = np.hypot(yy - yc, xx - xc)
            inside = (r <= radius) & ~self.refcol[xx]
            for y, x, rr in zip(yy[inside].tolist(), xx[inside].tolist(), r[inside].tolist()):
                events.append((g, y, x, float(amplitude_of(y, x, rr)), False, -1))
            self.large_events.append({"kind": kind, "int": i, "group": g, "y": round(yc, 2),
                                      "x": round(xc, 2), "radius": round(radius, 2),
                                      "pixels": int(inside.sum())})

        for _ in range(int(rng.poisson(p.showers_per_int))):
            g = int(rng.integers(1, self.ngroups))
            yc, xc = rng.uniform(0, ny), rng.uniform(0, nx)
            radius = rng.uniform(*p.shower_radius_px)
            level = rng.uniform(*p.shower_sigma_range)
            deposit("shower", g, yc, xc, radius,
                    lambda y, x, r, R=radius, lev=level:
                    lev * (1 - 0.5 * (r / R) ** 2) * float(self.diff_sigma[y, x]))
        for _ in range(int(rng.poisson(p.snowballs_per_int))):
            g = int(rng.integers(1, self.ngroups))
            yc, xc = rng.uniform(0, ny), rng.uniform(0, nx)
            core = rng.uniform(*p.snowball_core_radius_px)
            halo = core * p.snowball_halo_radii
            core_charge = p.snowball_core_fill
            deposit("snowball", g, yc, xc, halo,
                    lambda y, x, r, c=core:
                    float(linear_range[y, x]) * core_charge
                    * (1.0 if r <= c else p.snowball_halo_fraction))

    def _add_jump(self, events, i, g, y, x, amp, primary, parent):
        idx = len(self.jumps)
        last_usable = self.ngroups - 2 if self.ngroups > 2 else self.ngroups - 1
        first_usable = self.skip1 if i == 0 else self.skip2p
        self.jumps.append({
            "id": idx, "int": i, "group": g, "y": y, "x": x,
            "amplitude_dn": round(amp, 3),
            "sigma": round(amp / float(self.diff_sigma[y, x]), 3),
            "primary": primary, "parent": parent,
            # Both groups of the difference g-1 -> g are used by the default MIRI chain
            # (not flagged by rscd or lastframe); saturation and bad pixels are separate.
            "usable": bool(g - 1 >= first_usable and g <= last_usable),
            "bad_pixel": bool(self.mask_bits[y, x] & DQ["DO_NOT_USE"]),
            "saturated": False, "saturated_3x3": False,
        })
        events.append((g, y, x, amp, primary, idx))

    # --- the ramps ------------------------------------------------------------------------
    def ramp_planes(self, first_sat: np.ndarray) -> Iterator[np.ndarray]:
        """Yield the raw uint16 planes in file order (integration by integration, group by
        group). ``first_sat[i]`` (int16, -1 = never) is filled with the first group whose raw
        value reaches the SATURATION threshold.

        Works on float32 planes with preallocated buffers (float32 resolution, ~0.004 DN
        at 60 kDN, is far below the 0.29 DN rms of the final rounding to integers).
        """
        p = self.p
        ny, nx = self.shape
        f32 = np.float32
        children = np.random.SeedSequence(
            int(self.rngs["ramps"].integers(0, 2**63 - 1))).spawn(self.nints)
        lam = self.e_rate * self.tgroup  # electrons per group
        lo_idx = np.flatnonzero(lam.ravel() < 30.0)  # exact Poisson where the Gaussian is poor
        lam_lo = lam.ravel()[lo_idx]
        sq_lam = np.sqrt(lam).astype(f32)
        lam32 = lam.astype(f32)
        inv_gain = (1.0 / self.gain).astype(f32)
        ped = self.ped.astype(f32)
        dark_amp = self.dark_amp.astype(f32)
        rscd_amp = self.rscd_amp.astype(f32)
        reset_amp = self.reset_amp.astype(f32)
        read_sigma = (self.rn / math.sqrt(2.0)).astype(f32)
        c2, c3 = self.c2_32, self.c3_32
        c2x2, c3x3 = (2 * c2).astype(f32), (3 * c3).astype(f32)
        fw = self.full_well.astype(f32)
        fw_lin = self.full_well_lin.astype(f32)
        sat_thr = np.where(np.isnan(self.sat_ref), np.inf, self.sat_ref).astype(f32)
        tel_idx = np.flatnonzero(self.telegraph.ravel())
        last_offset = f32(p.last_frame_offset_dn) if self.ngroups > 2 else f32(0.0)

        charge = np.empty((ny, nx), f32)  # accumulated charge, DN
        lin = np.empty((ny, nx), f32)
        lin_prev = np.empty((ny, nx), f32)
        x = np.empty((ny, nx), f32)  # raw solution (warm start for the next group)
        fp = np.empty((ny, nx), f32)  # dL/dx at x
        tmp = np.empty((ny, nx), f32)
        rawf = np.empty((ny, nx), f32)
        satb = np.empty((ny, nx), bool)

        for i in range(self.nints):
            rng = np.random.Generator(np.random.PCG64(children[i]))
            i_dark = min(i, self.ndark - 1)
            i_reset = min(i, self.nreset - 1)
            charge.fill(0.0)
            tel_state = rng.integers(0, 2, tel_idx.size).astype(f32)
            ev = self.cr_events[i]
            ev_g = np.array([e[0] for e in ev], dtype=np.int64)
            ev_y = np.array([e[1] for e in ev], dtype=np.intp)
            ev_x = np.array([e[2] for e in ev], dtype=np.intp)
            ev_a = np.array([e[3] for e in ev], dtype=f32)
            ev_id = [e[5] for e in ev]
            bounds = np.searchsorted(ev_g, np.arange(self.ngroups + 1))
            fs = first_sat[i]
            for g in range(self.ngroups):
                # Photo + dark charge of this group (Poisson), in DN.
                inc = rng.standard_normal((ny, nx), dtype=f32)
                inc *= sq_lam
                inc += lam32
                if lo_idx.size:
                    inc.reshape(-1)[lo_idx] = rng.poisson(lam_lo)
                inc *= inv_gain
                charge += inc
                b0, b1 = bounds[g], bounds[g + 1]
                if b1 > b0:  # cosmic rays: charge from this group on
                    np.add.at(charge, (ev_y[b0:b1], ev_x[b0:b1]), ev_a[b0:b1])
                # Linearized signal.
                np.add(charge, ped, out=lin)
                np.multiply(dark_amp, f32(self.dark_anomaly_scale(i_dark, g)), out=tmp)
                lin += tmp
                if i >= 1 and g < self.skip2p:
                    np.multiply(rscd_amp, f32(p.rscd_anomaly_dn * math.exp(-g / p.rscd_tau_groups)), out=tmp)
                    lin += tmp
                if g == self.ngroups - 1 and last_offset:
                    lin += last_offset
                if self.drift is not None:
                    lin += self.drift_plane(i, g)
                noise = rng.standard_normal((ny, nx), dtype=f32)
                noise *= read_sigma
                lin += noise
                if tel_idx.size:
                    flips = rng.random(tel_idx.size) < p.telegraph_switch_prob
                    tel_state[flips] = 1.0 - tel_state[flips]
                    lin.reshape(-1)[tel_idx] += f32(p.telegraph_amplitude_dn) * tel_state
                np.minimum(lin, fw_lin, out=lin)
                # Raw = L^-1(lin): Newton, warm-started from the previous group.
                if g == 0:
                    np.copyto(x, lin)
                else:
                    np.subtract(lin, lin_prev, out=tmp)
                    tmp /= fp
                    x += tmp
                _newton_cubic(x, lin, c2, c3, c2x2, c3x3, tmp, fp)
                np.copyto(lin_prev, lin)
                np.minimum(x, fw, out=rawf)
                if g < self.reset_ngroups:
                    np.multiply(reset_amp, f32(self.reset_scale(i_reset, g)), out=tmp)
                    rawf += tmp
                if self.emi_terms:  # electronic pickup: on the raw reads, after the full well
                    rawf += self.emi_plane(i, g).astype(f32)
                np.rint(rawf, out=rawf)
                np.clip(rawf, 0.0, 65535.0, out=rawf)
                np.greater_equal(rawf, sat_thr, out=satb)
                fs[satb & (fs < 0)] = g
                for k in range(b0, b1):
                    if ev_id[k] < 0:  # a pixel of a shower or snowball
                        continue
                    y, xx = int(ev_y[k]), int(ev_x[k])
                    j = self.jumps[ev_id[k]]
                    j["saturated"] = bool(satb[y, xx])
                    j["saturated_3x3"] = bool(satb[max(0, y - 1):y + 2, max(0, xx - 1):xx + 2].any())
                yield rawf.astype(np.uint16)


# ---------------------------------------------------------------------------------------
# Writing the Level 1B exposure
# ---------------------------------------------------------------------------------------


def _times(m: _Model, p: SimParams) -> dict[str, Any]:
    start = Time(f"{p.date_obs}T{p.time_obs}", format="isot", scale="utc")
    # Each integration: a reset frame, then NGROUPS frames.
    int_dur = (m.ngroups + 1) * m.tframe
    starts = start.mjd + np.arange(m.nints) * int_dur / 86400.0
    ends = starts + int_dur / 86400.0
    return {"start": start, "starts": starts, "ends": ends, "int_dur": int_dur,
            "end": Time(ends[-1], format="mjd", scale="utc")}


def _primary_header(m: _Model, p: SimParams, name: str, filename: str) -> fits.Header:
    sub = m.sub
    tm = _times(m, p)
    start, end = tm["start"], tm["end"]
    exp_type = _EXP_TYPES.get(sub.name, "MIR_IMAGE")
    filt = _FILTERS.get(sub.name, p.filter)
    h = fits.Header()
    h["DATE"] = (f"{p.date_obs}T{p.time_obs}", "= obs. start, for reproducibility")
    h["ORIGIN"] = ("streamdet", "institution responsible for creating FITS file")
    h["TIMESYS"] = ("UTC", "principal time system for time-related keywords")
    h["TIMEUNIT"] = ("s", "default unit applicable to all time values")
    h["FILENAME"] = (filename, "name of the file")
    h["FILETYPE"] = ("uncalibrated", "type of data in the file")
    h["DATAMODL"] = ("Level1bModel", "type of data model")
    h["TELESCOP"] = ("JWST", "telescope used to acquire the data")
    h["HISTORY"] = "Simulated MIRI exposure written by streamdet.simulate"
    # Program / observation
    h["TITLE"] = ("streamdet simulated MIRI imaging", "proposal title")
    h["PI_NAME"] = ("Simulation", "principal investigator name")
    h["CATEGORY"] = ("CAL", "program category")
    h["DATE-OBS"] = (p.date_obs, "[yyyy-mm-dd] UTC date at start of exposure")
    h["TIME-OBS"] = (p.time_obs, "[hh:mm:ss.sss] UTC time at start of exposure")
    h["DATE-BEG"] = (start.isot, "date-time start of exposure")
    h["DATE-END"] = (end.isot, "date-time end of exposure")
    prog, obs, visit = name[2:7], name[7:10], name[10:13]
    ok = name.startswith("jw") and len(name) >= 25 and name[2:13].isdigit()
    prog, obs, visit = (prog, obs, visit) if ok else ("09999", "001", "001")
    h["OBS_ID"] = (f"V{prog}{obs}{visit}P0000000001101", "programmatic observation identifier")
    h["VISIT_ID"] = (f"{prog}{obs}{visit}", "visit identifier")
    h["PROGRAM"] = (prog, "program number")
    h["OBSERVTN"] = (obs, "observation number")
    h["VISIT"] = (visit, "visit number")
    h["VISITGRP"] = ("01", "visit group identifier")
    h["SEQ_ID"] = ("1", "parallel sequence identifier")
    h["ACT_ID"] = ("01", "activity identifier")
    h["EXPOSURE"] = ("1", "exposure request number")
    h["TEMPLATE"] = ("MIRI Imaging", "observation template used")
    h["OBSLABEL"] = ("streamdet simulation", "proposer label for the observation")
    h["VISITYPE"] = ("PRIME_TARGETED_FIXED", "visit type")
    h["VISITSTA"] = ("SUCCESSFUL", "status of a visit")
    h["TSOVISIT"] = (False, "time series observation visit indicator")
    h["ENG_QUAL"] = ("OK", "engineering data quality indicator")
    h["TARGPROP"] = ("SIMFIELD", "proposer's name for the target")
    h["TARGNAME"] = ("SIMFIELD", "standard astronomical catalog name for target")
    h["TARGTYPE"] = ("FIXED", "type of target (fixed, moving, generic)")
    h["TARG_RA"] = (p.target_ra, "target RA at mid time of exposure (deg)")
    h["TARG_DEC"] = (p.target_dec, "target Dec at mid time of exposure (deg)")
    # Instrument
    h["INSTRUME"] = ("MIRI", "instrument used to acquire the data")
    h["DETECTOR"] = ("MIRIMAGE", "name of detector used to acquire the data")
    h["FILTER"] = (filt, "name of the filter element used")
    if exp_type in ("MIR_4QPM", "MIR_LYOT"):
        h["CORONMSK"] = ({"MASK1065": "4QPM_1065", "MASK1140": "4QPM_1140",
                          "MASK1550": "4QPM_1550"}.get(sub.name, "LYOT_2300"),
                         "coronagraph mask used")
    # Exposure
    h["EXP_TYPE"] = (exp_type, "type of data in the exposure")
    h["EXPSTART"] = (start.mjd, "UTC exposure start time (MJD)")
    h["EXPMID"] = ((start.mjd + end.mjd) / 2.0, "UTC exposure mid time (MJD)")
    h["EXPEND"] = (end.mjd, "UTC exposure end time (MJD)")
    h["READPATT"] = (m.readpatt, "readout pattern")
    h["NOUTPUTS"] = (1, "number of detector outputs used")
    h["NINTS"] = (m.nints, "number of integrations in exposure")
    h["INTSTART"] = (1, "starting integration number in this segment")
    h["INTEND"] = (m.nints, "ending integration number in this segment")
    h["NGROUPS"] = (m.ngroups, "number of groups in integration")
    h["NFRAMES"] = (1, "number of frames per group")
    h["GROUPGAP"] = (0, "number of frames dropped between groups")
    h["MIRNGRPS"] = (m.ngroups, "MIRI flight software number of groups")
    h["MIRNFRMS"] = (1, "MIRI flight software number of frames")
    h["NSAMPLES"] = (1, "number of A/D samples per pixel")
    h["FRMDIVSR"] = (1, "divisor applied to frame-averaged groups")
    h["DRPFRMS1"] = (0, "frames dropped prior to first integration")
    h["DRPFRMS3"] = (0, "frames dropped between integrations")
    h["TSAMPLE"] = (10.0, "[us] time between samples")
    h["TFRAME"] = (m.tframe, "[s] time between frames")
    h["TGROUP"] = (m.tgroup, "[s] time between groups")
    h["EFFINTTM"] = ((m.ngroups - 1) * m.tgroup, "[s] effective integration time")
    h["EFFEXPTM"] = ((m.ngroups - 1) * m.tgroup * m.nints, "[s] effective exposure time")
    h["TMEASURE"] = ((m.ngroups - 1) * m.tgroup * m.nints, "[s] measurement time")
    h["DURATION"] = (tm["int_dur"] * m.nints, "[s] total duration of exposure")
    h["NRSTSTRT"] = (1, "number of resets at start of exposure")
    h["NRESETS"] = (1, "number of resets between integrations")
    h["ZEROFRAM"] = (False, "zero frame was downlinked separately")
    h["DATAPROB"] = (False, "science telemetry indicated a problem")
    h["SCA_NUM"] = (493, "sensor chip assembly number")
    # Subarray
    h["SUBARRAY"] = (sub.name, "subarray used")
    h["SUBSTRT1"] = (sub.xstart, "starting pixel in axis 1 direction")
    h["SUBSTRT2"] = (sub.ystart, "starting pixel in axis 2 direction")
    h["SUBSIZE1"] = (sub.xsize, "number of pixels in axis 1 direction")
    h["SUBSIZE2"] = (sub.ysize, "number of pixels in axis 2 direction")
    h["FASTAXIS"] = (1, "fast readout axis direction")
    h["SLOWAXIS"] = (2, "slow readout axis direction")
    # Dither
    h["PATTTYPE"] = ("NONE", "primary dither pattern type")
    h["NUMDTHPT"] = (1, "total number of points in pattern")
    h["PATT_NUM"] = (1, "position number in primary pattern")
    return h


def _sci_header(m: _Model, p: SimParams) -> fits.Header:
    h = _image_header("SCI", 16, (m.nints, m.ngroups) + m.shape, bzero=32768)
    h["BUNIT"] = ("DN", "physical units of the array values")
    # Pointing and a simple TAN WCS at the subarray centre (0.11"/pixel, V3 at PA_V3).
    scale = 0.11 / 3600.0
    roll = math.radians(p.pa_v3)
    h["RA_V1"] = (p.target_ra, "[deg] RA of telescope V1 axis")
    h["DEC_V1"] = (p.target_dec, "[deg] Dec of telescope V1 axis")
    h["PA_V3"] = (p.pa_v3, "[deg] position angle of V3-axis of JWST")
    h["WCSAXES"] = (2, "number of World Coordinate System axes")
    h["CRPIX1"] = ((m.shape[1] + 1) / 2.0, "axis 1 coordinate of the reference pixel")
    h["CRPIX2"] = ((m.shape[0] + 1) / 2.0, "axis 2 coordinate of the reference pixel")
    h["CRVAL1"] = (p.target_ra, "first axis value at the reference pixel")
    h["CRVAL2"] = (p.target_dec, "second axis value at the reference pixel")
    h["CTYPE1"] = ("RA---TAN", "first axis coordinate type")
    h["CTYPE2"] = ("DEC--TAN", "second axis coordinate type")
    h["CUNIT1"] = ("deg", "first axis units")
    h["CUNIT2"] = ("deg", "second axis units")
    h["CDELT1"] = (scale, "first axis increment per pixel")
    h["CDELT2"] = (scale, "second axis increment per pixel")
    h["PC1_1"] = (-math.cos(roll), "linear transformation matrix element")
    h["PC1_2"] = (math.sin(roll), "linear transformation matrix element")
    h["PC2_1"] = (math.sin(roll), "linear transformation matrix element")
    h["PC2_2"] = (math.cos(roll), "linear transformation matrix element")
    h["V2_REF"] = (-453.36, "[arcsec] V2 of the reference point (approx.)")
    h["V3_REF"] = (-374.07, "[arcsec] V3 of the reference point (approx.)")
    h["VPARITY"] = (-1, "sense of rotation Ideal xy vs V2V3")
    h["V3I_YANG"] = (4.45, "[deg] V3 to Ideal y angle (approx.)")
    h["RA_REF"] = (p.target_ra, "[deg] right ascension of the reference point")
    h["DEC_REF"] = (p.target_dec, "[deg] declination of the reference point")
    h["ROLL_REF"] = (p.pa_v3, "[deg] V3 roll angle at the reference point")
    h["XREF_SCI"] = ((m.shape[1] + 1) / 2.0, "aperture reference x in science frame")
    h["YREF_SCI"] = ((m.shape[0] + 1) / 2.0, "aperture reference y in science frame")
    return h


def _int_times_hdu(m: _Model, p: SimParams) -> fits.BinTableHDU:
    tm = _times(m, p)
    starts, ends = tm["starts"], tm["ends"]
    mids = (starts + ends) / 2.0
    # TDB offset (no barycentric light-time correction: the spacecraft position is not
    # simulated).
    tdb = lambda mjd: Time(mjd, format="mjd", scale="utc").tdb.mjd  # noqa: E731
    cols = [
        fits.Column("integration_number", "J", array=np.arange(1, m.nints + 1, dtype=np.int32)),
        fits.Column("int_start_MJD_UTC", "D", array=starts),
        fits.Column("int_mid_MJD_UTC", "D", array=mids),
        fits.Column("int_end_MJD_UTC", "D", array=ends),
        fits.Column("int_start_BJD_TDB", "D", array=tdb(starts)),
        fits.Column("int_mid_BJD_TDB", "D", array=tdb(mids)),
        fits.Column("int_end_BJD_TDB", "D", array=tdb(ends)),
    ]
    return fits.BinTableHDU.from_columns(cols, name="INT_TIMES")


def _group_hdu(m: _Model, p: SimParams) -> fits.BinTableHDU:
    tm = _times(m, p)
    n = m.nints * m.ngroups
    ints = np.repeat(np.arange(1, m.nints + 1), m.ngroups).astype(np.int32)
    groups = np.tile(np.arange(1, m.ngroups + 1), m.nints).astype(np.int16)
    # Group g of integration i ends after the reset frame and g+1 frames.
    end_mjd = tm["starts"][ints - 1] + (groups.astype(np.float64) + 1) * m.tframe / 86400.0
    t = Time(end_mjd, format="mjd", scale="utc")
    dts = t.to_datetime()
    day = np.array([d.timetuple().tm_yday for d in dts], dtype=np.int16)
    ms = np.array([(d.hour * 3600 + d.minute * 60 + d.second) * 1000 + d.microsecond // 1000
                   for d in dts], dtype=np.int32)
    sub_ms = np.array([d.microsecond % 1000 for d in dts], dtype=np.int16)
    iso = np.array([d.strftime("%Y-%m-%dT%H:%M:%S.%f") for d in dts])
    cols = [
        fits.Column("integration_number", "J", array=ints),
        fits.Column("group_number", "I", array=groups),
        fits.Column("end_day", "I", array=day),
        fits.Column("end_milliseconds", "J", array=ms),
        fits.Column("end_submilliseconds", "I", array=sub_ms),
        fits.Column("group_end_time", "26A", array=iso),
        fits.Column("number_of_columns", "I", array=np.full(n, m.shape[1], np.int16)),
        fits.Column("number_of_rows", "I", array=np.full(n, m.shape[0], np.int16)),
        fits.Column("number_of_gaps", "I", array=np.zeros(n, np.int16)),
        fits.Column("completion_code_number", "I", array=np.zeros(n, np.int16)),
        fits.Column("completion_code_text", "36A", array=np.array(["COMPLETE"] * n)),
        fits.Column("bary_end_time", "D", array=end_mjd),
        fits.Column("helio_end_time", "D", array=end_mjd),
    ]
    return fits.BinTableHDU.from_columns(cols, name="GROUP")


def _write_uncal(m: _Model, p: SimParams, path: Path, name: str) -> np.ndarray:
    """Write the Level 1B file; returns first_sat [nints, ny, nx] (int16, -1 = never)."""
    prim = fits.PrimaryHDU(header=_primary_header(m, p, name, path.name))
    prim.writeto(path)
    first_sat = np.full((m.nints,) + m.shape, -1, dtype=np.int16)
    _stream_image(path, _sci_header(m, p),
                  (_raw_to_fits_int16(pl) for pl in m.ramp_planes(first_sat)))
    _append_hdus(path, [_group_hdu(m, p), _int_times_hdu(m, p), _asdf_hdu()])
    return first_sat


# ---------------------------------------------------------------------------------------
# Reference files
# ---------------------------------------------------------------------------------------


def _ref_primary(m: _Model, p: SimParams, reftype: str, datamodel: str, filename: str,
                 descrip: str, fullframe: bool, extra: dict | None = None) -> fits.PrimaryHDU:
    h = fits.Header()
    h["DATE"] = (f"{p.date_obs}T{p.time_obs}", "= obs. start, for reproducibility")
    h["FILENAME"] = filename
    h["DATAMODL"] = datamodel
    h["TELESCOP"] = "JWST"
    h["INSTRUME"] = "MIRI"
    h["DETECTOR"] = "MIRIMAGE"
    h["REFTYPE"] = reftype.upper()
    h["PEDIGREE"] = "SIMULATION"
    h["DESCRIP"] = descrip
    h["AUTHOR"] = "streamdet.simulate"
    h["USEAFTER"] = "2000-01-01T00:00:00"
    sub = SUBARRAYS["FULL"] if fullframe else m.sub
    # Full-frame references serve every subarray (the steps cut them by SUBSTRT/SUBSIZE).
    h["SUBARRAY"] = "GENERIC" if fullframe else sub.name
    h["SUBSTRT1"] = sub.xstart
    h["SUBSTRT2"] = sub.ystart
    h["SUBSIZE1"] = sub.xsize
    h["SUBSIZE2"] = sub.ysize
    h["FASTAXIS"] = 1
    h["SLOWAXIS"] = 2
    for k, v in (extra or {}).items():
        h[k] = v
    h["HISTORY"] = "Simulated reference file written by streamdet.simulate; it describes "
    h["HISTORY"] = "exactly the detector that produced the matching simulated exposure."
    return fits.PrimaryHDU(header=h)


def _image_hdu(data: np.ndarray, name: str, bunit: str | None = None) -> fits.ImageHDU:
    hdu = fits.ImageHDU(data=data, name=name)
    if bunit:
        hdu.header["BUNIT"] = bunit
    return hdu


def _write_refs(m: _Model, p: SimParams, refdir: Path, serial: str) -> dict[str, Path]:
    det = m.det
    ff = p.fullframe_refs
    ys, xs = (slice(None), slice(None)) if ff else m.sub.full_frame_slices
    out: dict[str, Path] = {}

    def path_for(reftype):
        pth = refdir / f"jwst_miri_{reftype}_{serial}.fits"
        out[reftype] = pth
        return pth

    # MASK: compressed bits + DQ_DEF.
    jwst_bits = det.mask_bits[ys, xs]
    compressed = np.zeros(jwst_bits.shape, dtype=np.uint32)
    for bit, nm, _ in MASK_DQ_DEF:
        compressed[(jwst_bits & np.uint32(DQ[nm])) != 0] |= np.uint32(1 << bit)
    pth = path_for("mask")
    fits.HDUList([
        _ref_primary(m, p, "mask", "MaskModel", pth.name, "Simulated MIRI imager bad pixel mask", ff,
                     {"EXP_TYPE": "MIR_IMAGE", "READPATT": "ANY"}),
        _image_hdu(compressed, "DQ"),
        _dq_def_hdu(MASK_DQ_DEF),
    ]).writeto(pth)

    # SATURATION: raw DN threshold, NaN + NO_SAT_CHECK where not checked.
    sat = np.where(det.no_sat, np.nan, det.sat)[ys, xs].astype(np.float32)
    sat_dq = np.where(det.no_sat[ys, xs], DQ["NO_SAT_CHECK"], 0).astype(np.uint32)
    pth = path_for("saturation")
    fits.HDUList([
        _ref_primary(m, p, "saturation", "SaturationModel", pth.name,
                     "Simulated MIRI imager saturation thresholds (raw DN)", ff),
        _image_hdu(sat, "SCI", "DN"), _image_hdu(sat_dq, "DQ"),
        _standard_dq_def(["NO_SAT_CHECK"]),
    ]).writeto(pth)

    # LINEARITY: corrected = c0 + c1 x + c2 x^2 + c3 x^3, x = raw DN (incl. pedestal).
    ny_r, nx_r = sat.shape
    coeffs = np.zeros((4, ny_r, nx_r), dtype=np.float32)
    coeffs[1] = 1.0
    coeffs[2] = det.c2[ys, xs]
    coeffs[3] = det.c3[ys, xs]
    coeffs[:, det.no_lin[ys, xs]] = np.nan
    lin_dq = np.where(det.no_lin[ys, xs], DQ["NO_LIN_CORR"], 0).astype(np.uint32)
    pth = path_for("linearity")
    fits.HDUList([
        _ref_primary(m, p, "linearity", "LinearityModel", pth.name,
                     "Simulated MIRI imager linearity correction (raw DN incl. pedestal)", ff,
                     {"FILTER": "N/A", "BAND": "N/A"}),
        _image_hdu(coeffs, "COEFFS"), _image_hdu(lin_dq, "DQ"),
        _standard_dq_def(["NO_LIN_CORR"]),
    ]).writeto(pth)

    # GAIN (e-/DN) and READNOISE (CDS, DN) for this read pattern.
    pth = path_for("gain")
    fits.HDUList([
        _ref_primary(m, p, "gain", "GainModel", pth.name, "Simulated MIRI imager gain", ff,
                     {"FILTER": "N/A", "BAND": "N/A"}),
        _image_hdu(det.gain[ys, xs].astype(np.float32), "SCI", "electrons/DN"),
    ]).writeto(pth)
    rn = (det.rn_slow if m.readpatt == "SLOWR1" else det.rn_fast)[ys, xs].astype(np.float32)
    pth = path_for("readnoise")
    fits.HDUList([
        _ref_primary(m, p, "readnoise", "ReadnoiseModel", pth.name,
                     "Simulated MIRI imager read noise of a frame difference (CDS)", ff,
                     {"READPATT": m.readpatt}),
        _image_hdu(rn, "SCI", "DN"),
    ]).writeto(pth)

    # RSCD: groups to flag, for every subarray and read pattern.
    rows = [(s.name, rp) for s in SUBARRAYS.values() for rp in s.readpatts]
    table = fits.BinTableHDU.from_columns([
        fits.Column("subarray", "17A", array=np.array([r[0] for r in rows])),
        fits.Column("readpatt", "12A", array=np.array([r[1] for r in rows])),
        fits.Column("group_skip1", "J", array=np.full(len(rows), p.rscd_skip_int1, np.int32)),
        fits.Column("group_skip", "J", array=np.full(len(rows), p.rscd_skip_int2p, np.int32)),
    ], name="RSCD_GROUP_SKIP")
    pth = path_for("rscd")
    fits.HDUList([
        _ref_primary(m, p, "rscd", "RSCDModel", pth.name,
                     "Simulated MIRI RSCD groups to flag", False,
                     {"SUBARRAY": "GENERIC", "READPATT": "ANY"}),
        table,
    ]).writeto(pth)

    # DARK: [ndark, ngroups, ny, nx] in the science subarray, streamed plane by plane.
    # The mean dark current goes into the scalar AVDRKCUR keyword (DN/s, jwst adds it to the
    # median rate in the Poisson variance). jwst 3.0 would ignore a 2-D AVDRKCUR plane for
    # a RampModel read from a file (it compares the plane's shape with the model's unset
    # array, warns and skips it), so no plane is written.
    light = ~m.refcol
    avdrk = float(np.mean(m.dark_rate[:, light])) if light.any() else 0.0
    sub_kw = {"EXP_TYPE": "MIR_IMAGE", "READPATT": m.readpatt, "NFRAMES": 1, "GROUPGAP": 0,
              "NGROUPS": m.ngroups, "NINTS": m.ndark,
              "AVDRKCUR": (round(avdrk, 6), "[DN/s] mean dark current (Poisson variance)")}
    pth = path_for("dark")
    _ref_primary(m, p, "dark", "DarkMIRIModel", pth.name,
                 "Simulated MIRI integration-dependent dark", False, sub_kw).writeto(pth)
    planes = (_float_to_fits(m.dark_plane(i, g)) for i in range(m.ndark) for g in range(m.ngroups))
    _stream_image(pth, _image_header("SCI", -32, (m.ndark, m.ngroups) + m.shape), planes)
    dark_dq = np.zeros((m.ndark, 1) + m.shape, dtype=np.uint32)
    dark_dq[:, 0][:, m.unreliable_dark] = DQ["UNRELIABLE_DARK"]
    _append_hdus(pth, [_image_hdu(dark_dq, "DQ"), _standard_dq_def(["UNRELIABLE_DARK"])])

    # RESET: [nreset, reset_ngroups, ny, nx] raw-DN transient; 2-D DQ.
    pth = path_for("reset")
    _ref_primary(m, p, "reset", "ResetModel", pth.name, "Simulated MIRI reset transient", False,
                 {"READPATT": m.readpatt, "NGROUPS": m.reset_ngroups, "NINTS": m.nreset}
                 ).writeto(pth)
    planes = (_float_to_fits(m.reset_plane(i, g)) for i in range(m.nreset)
              for g in range(m.reset_ngroups))
    _stream_image(pth, _image_header("SCI", -32, (m.nreset, m.reset_ngroups) + m.shape), planes)
    _append_hdus(pth, [_image_hdu(np.zeros(m.shape, np.uint32), "DQ")])
    return out


# ---------------------------------------------------------------------------------------
# CRDS cache
# ---------------------------------------------------------------------------------------

#: Reference types that resolve to files in the generated cache.
REFTYPES = ("mask", "saturation", "linearity", "rscd", "dark", "gain", "readnoise", "reset")

#: Reference types the jwst 3.0 Detector1 steps (and a few neighbours) may ask for that
#: this cache declares not applicable, so the steps skip themselves instead of failing.
NA_REFTYPES = (
    "ipc", "superbias", "refpix", "sirskernel", "emicorr", "pictureframe", "persat",
    "trapdensity", "trappars", "flat", "pastasoss", "area", "drizpars",
)

#: Step classes of calwebb_detector1 whose ``pars-<class>`` parameter references are N/A
#: (the step-spec defaults apply, as in the parity tests).
PARS_STEPS = (
    "Detector1Pipeline", "GroupScaleStep", "DQInitStep", "EmiCorrStep", "SaturationStep",
    "IPCStep", "SuperBiasStep", "RefPixStep", "RscdStep", "FirstFrameStep", "LastFrameStep",
    "LinearityStep", "DarkCurrentStep", "ResetStep", "PersistenceStep", "ChargeMigrationStep",
    "JumpStep", "PictureFrameStep", "CleanFlickerNoiseStep", "RampFitStep", "GainScaleStep",
)

_CRDS_PARKEYS = {
    # reftype: (match keys, values for this exposure); 'N/A' means "don't care"
    "mask": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "saturation": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "linearity": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "gain": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME"),
    "readnoise": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
    "rscd": ("META.INSTRUMENT.DETECTOR",),
    "dark": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
    "reset": ("META.INSTRUMENT.DETECTOR", "META.SUBARRAY.NAME", "META.EXPOSURE.READPATT"),
}


def _write_pars_file(path: Path, step: str, reftype: str, parameters: dict[str, Any],
                     date_obs: str) -> None:
    """An stpipe parameter reference: ``class``, ``name``, ``parameters`` (only the values
    that differ from the step's defaults; a pipeline's ``steps`` as a list of such
    trees) and the CRDS ``meta`` that ``Step.export_config(include_metadata=True)``
    writes."""
    import asdf  # noqa: PLC0415 - only caches that ship parameter references need it

    from streamdet.core import jwstparams  # noqa: PLC0415

    alias = jwstparams.alias_of(step)
    if step == jwstparams.PIPELINE_NAME:
        full = jwstparams.PIPELINE_CLASS
    elif alias is not None:
        full = jwstparams.STEP_CLASSES[alias]
    else:
        raise SimulationError(f"crds_pars: {step!r} is not a jwst Detector1 step class")
    params = dict(parameters)
    tree: dict[str, Any] = {"class": full, "name": step if alias is None else alias}
    substeps = params.pop("steps", None)
    tree["parameters"] = params
    if substeps:
        tree["steps"] = [{"class": jwstparams.STEP_CLASSES[a], "name": a,
                          "parameters": dict(v)} for a, v in substeps.items()]
    tree["meta"] = {
        "author": "streamdet.simulate", "date": f"{date_obs}T00:00:00",
        "description": f"Parameters for calibration step {full}",
        "instrument": {"name": "MIRI"}, "origin": "streamdet", "pedigree": "GROUND",
        "reftype": reftype, "telescope": "JWST", "useafter": "2000-01-01T00:00:00",
    }
    asdf.AsdfFile(tree).write_to(str(path))


def _mapping_text(header: dict, selector_text: str) -> str:
    """Mapping file text with a correct sha1sum (crds: sha1 of the text without the lines
    that contain 'sha1sum')."""
    lines = ["header = {"]
    for k in sorted(list(header) + ["sha1sum"]):
        v = "@SHA1@" if k == "sha1sum" else header[k]
        lines.append(f"    {k!r} : {v!r},")
    lines.append("}")
    text = "\n".join(lines) + "\n\nselector = " + selector_text + "\n"
    kept = "".join(ln for ln in text.splitlines(True) if "sha1sum" not in ln)
    return text.replace("@SHA1@", hashlib.sha1(kept.encode("utf-8")).hexdigest())


def _write_crds_cache(m: _Model, p: SimParams, root: Path, serial: str, ref_files: dict[str, Path]
                      ) -> str:
    """Write mappings + config; the reference files are already in references/jwst/miri."""
    mapdir = root / "mappings" / "jwst"
    cfgdir = root / "config" / "jwst"
    mapdir.mkdir(parents=True, exist_ok=True)
    cfgdir.mkdir(parents=True, exist_ok=True)
    context = f"jwst_{serial}.pmap"
    imap = f"jwst_miri_{serial}.imap"
    derived = "generated by streamdet.simulate"
    ff = p.fullframe_refs
    values = {
        "META.INSTRUMENT.DETECTOR": "MIRIMAGE",
        "META.SUBARRAY.NAME": m.sub.name,
        "META.EXPOSURE.READPATT": m.readpatt,
    }
    imap_sel = {}
    for reftype in REFTYPES:
        keys = _CRDS_PARKEYS[reftype]
        match = []
        for k in keys:
            v = values[k]
            if k == "META.SUBARRAY.NAME" and ff and reftype in ("mask", "saturation", "linearity",
                                                                "gain", "readnoise"):
                v = "N/A"  # a full-frame reference serves every subarray
            match.append(v)
        rmap = f"jwst_miri_{reftype}_{serial}.rmap"
        header = {
            "classes": ("Match", "UseAfter"),
            "derived_from": derived,
            "filekind": reftype.upper(),
            "instrument": "MIRI",
            "mapping": "REFERENCE",
            "name": rmap,
            "observatory": "JWST",
            "parkey": (tuple(keys), ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME")),
        }
        sel = ("Match({\n    " + repr(tuple(match)) + " : UseAfter({\n        "
               + repr("2000-01-01 00:00:00") + " : " + repr(ref_files[reftype].name)
               + ",\n    }),\n})")
        (mapdir / rmap).write_text(_mapping_text(header, sel))
        imap_sel[reftype] = rmap
    for reftype in NA_REFTYPES:
        imap_sel[reftype] = "N/A"
    for step in PARS_STEPS:
        imap_sel["pars-" + step.lower()] = "N/A"
    for step, parameters in sorted(p.crds_pars.items()):
        reftype = "pars-" + step.lower()
        asdf_name = f"jwst_miri_{reftype}_{serial}.asdf"
        _write_pars_file(root / "references" / "jwst" / "miri" / asdf_name, step,
                         reftype, parameters, p.date_obs)
        rmap = f"jwst_miri_{reftype}_{serial}.rmap"
        header = {
            "classes": ("Match", "UseAfter"),
            "derived_from": derived,
            "file_ext": ".asdf",
            "filekind": reftype.upper(),
            "instrument": "MIRI",
            "mapping": "REFERENCE",
            "name": rmap,
            "observatory": "JWST",
            "parkey": (("META.INSTRUMENT.DETECTOR",),
                       ("META.OBSERVATION.DATE", "META.OBSERVATION.TIME")),
        }
        sel = ("Match({\n    ('MIRIMAGE',) : UseAfter({\n        "
               + repr("2000-01-01 00:00:00") + " : " + repr(asdf_name) + ",\n    }),\n})")
        (mapdir / rmap).write_text(_mapping_text(header, sel))
        imap_sel[reftype] = rmap
    header = {"derived_from": derived, "instrument": "MIRI", "mapping": "INSTRUMENT",
              "name": imap, "observatory": "JWST", "parkey": ("REFTYPE",)}
    sel = "{\n" + "".join(f"    {k!r} : {v!r},\n" for k, v in sorted(imap_sel.items())) + "}"
    (mapdir / imap).write_text(_mapping_text(header, sel))
    header = {"derived_from": derived, "mapping": "PIPELINE", "name": context,
              "observatory": "JWST", "parkey": ("META.INSTRUMENT.NAME",)}
    (mapdir / context).write_text(_mapping_text(header, "{\n    'MIRI' : " + repr(imap) + ",\n}"))

    server_config = {
        "observatory": "jwst",
        "operational_context": context,
        "latest_context": context,
        "edit_context": context,
        "build_context": context,
        "bad_files_list": [],
        "force_remote_mode": False,
        "last_synced": f"{p.date_obs} 00:00:00",
        "mappings": sorted(x.name for x in mapdir.iterdir()),
        "connected": False,
        "crds_version": {"str": "streamdet offline cache"},
    }
    (cfgdir / "server_config").write_text(repr(server_config) + "\n")
    (cfgdir / "ref_cache_subdir_mode").write_text("instrument\n")
    (cfgdir / "bad_files.txt").write_text("")
    return context


# ---------------------------------------------------------------------------------------
# Truth
# ---------------------------------------------------------------------------------------


def _json_lines(obj: dict) -> str:
    """JSON with one list item per line (readable, and fast: the C encoder does the items)."""
    parts = []
    for k, v in obj.items():
        if isinstance(v, list) and v and isinstance(v[0], dict):
            body = ",\n  ".join(json.dumps(item) for item in v)
            parts.append(f"{json.dumps(k)}: [\n  {body}\n ]")
        else:
            parts.append(f"{json.dumps(k)}: {json.dumps(v)}")
    return "{\n " + ",\n ".join(parts) + "\n}\n"


def _write_truth(m: _Model, p: SimParams, truthdir: Path, name: str, first_sat: np.ndarray,
                 meta: dict) -> tuple[Path, Path]:
    rate_path = truthdir / f"{name}_truth_rate.fits"
    h = fits.Header()
    h["BUNIT"] = ("DN/s", "linearized DN per second, dark subtracted")
    h["SUBARRAY"] = m.sub.name
    h["SUBSTRT1"] = m.sub.xstart
    h["SUBSTRT2"] = m.sub.ystart
    h["SEED"] = meta["seed"]
    h["COMMENT"] = "True count rate: the slope a perfect Detector1 chain recovers per pixel."
    fits.PrimaryHDU(data=m.truth.astype(np.float32), header=h).writeto(rate_path)

    sat_pix = np.flatnonzero(np.any(first_sat >= 0, axis=0).ravel())
    ny, nx = m.shape
    saturated = []
    for k in sat_pix.tolist():
        y, x = divmod(k, nx)
        fsg = [int(v) if v >= 0 else None for v in first_sat[:, y, x].tolist()]
        saturated.append({"y": y, "x": x, "first_saturated_group": fsg})
    bad = []
    flagged = np.flatnonzero((m.mask_bits & ~np.uint32(DQ["REFERENCE_PIXEL"])).ravel()
                             | m.no_lin.ravel() | np.isnan(m.sat_ref).ravel()
                             | m.unreliable_dark.ravel())
    names_of = lambda v: [n for n, b in DQ.items() if v & b]  # noqa: E731
    for k in flagged.tolist():
        y, x = divmod(k, nx)
        flags = int(m.mask_bits[y, x]) & ~DQ["REFERENCE_PIXEL"]
        extra = 0
        if m.no_lin[y, x]:
            extra |= DQ["NO_LIN_CORR"]
        if np.isnan(m.sat_ref[y, x]):
            extra |= DQ["NO_SAT_CHECK"]
        if m.unreliable_dark[y, x]:
            extra |= DQ["UNRELIABLE_DARK"]
        bad.append({"y": y, "x": x, "flags": flags | extra, "names": names_of(flags | extra),
                    "mask_flags": flags,
                    "extra_rate_dn_s": round(float(m.extra_rate[y, x]), 4)})
    catalog = {
        "description": "Effects injected by streamdet.simulate. Pixel coordinates (y, x) are "
                       "0-based in the subarray; add SUBSTRT-1 for full-frame positions. "
                       "Jump 'group' is the first group containing the charge (the jump is in "
                       "the difference group-1 -> group); 'sigma' is the amplitude over the "
                       "noise of one group difference; 'usable' says both groups are fitted by "
                       "the default MIRI chain (not flagged by rscd/lastframe); 'saturated' / "
                       "'saturated_3x3' say the pixel / its 3x3 neighbourhood (which jwst's "
                       "saturation step also flags) had reached the SATURATION threshold at that "
                       "group; 'primary' false marks charge shared with a neighbour of hit "
                       "'parent'. 'saturated' lists each pixel's first saturated group per "
                       "integration (null: never).",
        **meta,
        "frame_time_s": m.tframe,
        "group_time_s": m.tgroup,
        "rscd_flagged_groups": {"int1": m.skip1, "int2+": m.skip2p},
        "reference_columns": np.flatnonzero(m.refcol).tolist(),
        "params": p.to_dict(),
        "sources": m.sources,
        "jumps": m.jumps,
        **({"large_events": getattr(m, "large_events", [])} if p.has_large_events else {}),
        "saturated": saturated,
        "bad_pixels": bad,
    }
    if m.emi_terms:
        spatial, frame, integration = m.emi_clocks
        catalog["emi"] = {
            "description": "Sinusoidal EMI added to every raw read: amplitude_dn * sin(2 pi "
                           "frequency_hz * t + phase_rad), t = clocks * clock_s counted from the "
                           "first read of the exposure; a pixel (y, x) of group g of integration "
                           "i is read at clocks = i * integration_clocks + g * frame_clocks + "
                           "y * row_clocks + (x // 4) * nsamples.",
            "clock_s": EMI_PIXEL_CLOCK_S,
            "row_clocks": int(spatial[1, 0]) if spatial.shape[0] > 1 else None,
            "nsamples": int(spatial[0, 4]) if spatial.shape[1] > 4 else 1,
            "frame_clocks": int(frame),
            "integration_clocks": int(integration),
            "components": [{"frequency_hz": f, "amplitude_dn": a, "phase_rad": ph}
                           for f, a, ph in m.emi_terms],
        }
    cat_path = truthdir / f"{name}_truth_catalog.json"
    cat_path.write_text(_json_lines(catalog))
    return rate_path, cat_path


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------

_DEFAULT_NAME = "jw09999001001_01101_00001"
_PRODUCTS = ("refs", "crds_cache", "truth", "simulation.json", "crds_env.sh")


def _check_args(outdir, subarray, ngroups, nints, seed, readpatt, name) -> tuple[Path, Subarray, str]:
    if not isinstance(subarray, str) or subarray.upper() not in SUBARRAYS:
        raise SimulationError(
            f"unknown subarray {subarray!r}; choose one of {', '.join(SUBARRAYS)}")
    sub = SUBARRAYS[subarray.upper()]
    for label, v in (("ngroups", ngroups), ("nints", nints)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise SimulationError(f"{label} must be an integer >= 1, got {v!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SimulationError(f"seed must be an integer >= 0, got {seed!r}")
    readpatt = str(readpatt).upper()
    if readpatt not in ("FASTR1", "SLOWR1"):
        raise SimulationError(f"unknown read pattern {readpatt!r}; choose FASTR1 or SLOWR1")
    sub.frame_time(readpatt)  # raises for SLOWR1 on a subarray
    if nints * ngroups > 65535:
        raise SimulationError(f"ngroups x nints = {ngroups * nints} is too large")
    if name is not None and (not name or any(c in name for c in "/\\ \t\n") or name.startswith(".")):
        raise SimulationError(f"name must be a plain file-name prefix, got {name!r}")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise SimulationError(f"output path {str(outdir)!r} exists and is not a directory")
    return outdir, sub, readpatt


def _check_emi(p: SimParams, sub: Subarray, readpatt: str) -> None:
    freqs, amps, phases = p.emi_frequencies_hz, p.emi_amplitudes_dn, p.emi_phases_rad
    if len(amps) != len(freqs):
        raise SimulationError(f"emi_amplitudes_dn has {len(amps)} entries but "
                              f"emi_frequencies_hz has {len(freqs)}")
    if len(phases) > len(freqs):
        raise SimulationError(f"emi_phases_rad has {len(phases)} entries, more than the "
                              f"{len(freqs)} frequencies")
    for label, values in (("emi_frequencies_hz", freqs), ("emi_amplitudes_dn", amps),
                          ("emi_phases_rad", phases)):
        for v in values:
            if (isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating))
                    or not math.isfinite(v)):
                raise SimulationError(f"{label} must hold finite numbers, got {v!r}")
    if any(f <= 0 for f in freqs):
        raise SimulationError(f"emi_frequencies_hz must be > 0, got {list(freqs)}")
    if freqs:
        emi_read_clocks(sub.name, readpatt, 1)  # raises for a readout without a clock model


#: Serials handed out in this process: serial -> output directory. crds caches mappings by
#: name per process, so two caches used in one process must not share a serial.
_SERIALS_IN_PROCESS: dict[str, str] = {}


def _serial(outdir: Path, sub: Subarray, ngroups, nints, seed, readpatt, params: SimParams,
            name: str) -> str:
    """A 4-digit serial for the mapping and reference names, unique to this output.

    crds caches mappings by name within a process, so two caches resolved in one process
    must not share names. crds' naming convention (``config.MAPPING_RE``) has exactly 4
    digits (longer serials also resolve, but are not valid CRDS names), so the serial is
    derived from a hash of the output directory and all parameters, and moved on if this
    process already gave it to another directory. Caches made by different processes
    clash with probability 1/9000 per pair.
    """
    key = json.dumps([str(outdir.resolve()), sub.name, int(ngroups), int(nints), int(seed),
                      readpatt, params.to_dict(), name], sort_keys=True)
    n = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    here = str(outdir.resolve())
    for k in range(9000):
        serial = f"{1000 + (n + k) % 9000:04d}"
        owner = _SERIALS_IN_PROCESS.get(serial)
        if owner is None or owner == here:
            _SERIALS_IN_PROCESS[serial] = here
            return serial
    raise SimulationError("no free CRDS serial left in this process")  # pragma: no cover


def simulate(
    outdir: str | os.PathLike,
    *,
    subarray: str = "SUB64",
    ngroups: int = 10,
    nints: int = 2,
    seed: int = 0,
    readpatt: str = "FASTR1",
    overwrite: bool = False,
    params: SimParams | None = None,
    name: str | None = None,
    large_events: bool = False,
) -> SimResult:
    """Simulate one MIRI imager exposure, its reference files and a CRDS cache in ``outdir``.

    Parameters
    ----------
    outdir
        Output directory; created if missing. An existing non-empty directory is refused
        unless ``overwrite`` is true, in which case this function's own products in it are
        replaced (other files are left alone).
    subarray
        A key of :data:`SUBARRAYS`.
    ngroups, nints
        Groups per integration and integrations (NFRAMES = 1, GROUPGAP = 0).
    seed
        Everything is a deterministic function of the seed and the other arguments
        (except ``outdir``, which only changes the CRDS names).
    readpatt
        FASTR1, or SLOWR1 (FULL only).
    params
        Physical parameters; :class:`SimParams` defaults if None.
    name
        File-name prefix; the exposure is ``<name>_mirimage_uncal.fits``.
    large_events
        Add MIRI showers and snowballs (:data:`LARGE_EVENT_RATES` per integration, unless
        ``params`` sets their rates).
    """
    outdir, sub, readpatt = _check_args(outdir, subarray, ngroups, nints, seed, readpatt, name)
    params = params if params is not None else SimParams()
    if not isinstance(params, SimParams):
        raise SimulationError(f"params must be a SimParams, got {type(params).__name__}")
    if large_events and not params.has_large_events:
        params = dataclasses.replace(params, **LARGE_EVENT_RATES)
    _check_emi(params, sub, readpatt)
    name = name or _DEFAULT_NAME
    uncal_name = f"{name}_mirimage_uncal.fits"
    if outdir.exists() and any(outdir.iterdir()):
        if not overwrite:
            raise SimulationError(
                f"output directory {str(outdir)!r} is not empty (overwrite=True / --overwrite replaces it)")
        for item in (*_PRODUCTS, uncal_name):
            target = outdir / item
            if target.is_dir() and not target.is_symlink():
                for sub_p in target.rglob("*"):  # a read-only cache may have been left behind
                    try:
                        sub_p.chmod(0o755 if sub_p.is_dir() else 0o644)
                    except OSError:
                        pass
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    outdir.mkdir(parents=True, exist_ok=True)

    serial = _serial(outdir, sub, ngroups, nints, seed, readpatt, params, name)
    model = _Model(params, sub, int(ngroups), int(nints), readpatt, int(seed))

    crds_root = outdir / "crds_cache"
    cache_refdir = crds_root / "references" / "jwst" / "miri"
    cache_refdir.mkdir(parents=True, exist_ok=True)
    refdir = outdir / "refs"
    refdir.mkdir(exist_ok=True)
    truthdir = outdir / "truth"
    truthdir.mkdir(exist_ok=True)

    cache_refs = _write_refs(model, params, cache_refdir, serial)
    refs: dict[str, Path] = {}
    for reftype, pth in cache_refs.items():
        dst = refdir / pth.name
        try:
            os.link(pth, dst)  # same bytes, no extra disk space
        except OSError:
            shutil.copy2(pth, dst)
        refs[reftype] = dst.resolve()
    context = _write_crds_cache(model, params, crds_root, serial, cache_refs)

    uncal = outdir / uncal_name
    first_sat = _write_uncal(model, params, uncal, name)

    meta = {"seed": int(seed), "subarray": sub.name, "readpatt": readpatt,
            "ngroups": int(ngroups), "nints": int(nints), "name": name}
    truth_rate, truth_cat = _write_truth(model, params, truthdir, name, first_sat, meta)
    env = crds_env(crds_root, context)
    result = SimResult(
        uncal=uncal.resolve(), refs=refs, crds_path=crds_root.resolve(), context=context,
        truth_rate=truth_rate.resolve(), truth_catalog=truth_cat.resolve(), env=env,
        outdir=outdir.resolve(), name=name,
    )
    manifest = {
        **meta,
        "uncal": str(result.uncal),
        "refs": {k: str(v) for k, v in refs.items()},
        "crds_path": str(result.crds_path),
        "context": context,
        "truth_rate": str(result.truth_rate),
        "truth_catalog": str(result.truth_catalog),
        "env": env,
        "params": params.to_dict(),
    }
    (outdir / "simulation.json").write_text(json.dumps(manifest, indent=1))
    (outdir / "crds_env.sh").write_text(result.shell_exports() + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m streamdet.simulate OUTDIR [...]`` (the CLI proper lives in streamdet.cli)."""
    ap = argparse.ArgumentParser(prog="python -m streamdet.simulate", description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--subarray", default="SUB64")
    ap.add_argument("--ngroups", type=int, default=10)
    ap.add_argument("--nints", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--readpatt", default="FASTR1")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        res = simulate(args.outdir, subarray=args.subarray, ngroups=args.ngroups, nints=args.nints,
                       seed=args.seed, readpatt=args.readpatt, overwrite=args.overwrite)
    except SimulationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(res.uncal)
    print(res.shell_exports())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

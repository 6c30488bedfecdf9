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
rays and each integration's noise have their own streams. Only numpy and astropy are used
(asdf too when the cache ships step-parameter references); large exposures are generated
and written one group plane at a time. DQ values come from :mod:`streamdet.core.dqflags`.

The modules, in the order :func:`simulate` uses them:

=================  ===================================================================
``params``         :class:`SimParams` (every physical knob), :class:`SimulationError`
``readout``        full frame, :data:`SUBARRAYS`, frame times, the EMI read clocks
``detector``       the full-frame detector drawn from the seed
``scene``          sky and point sources
``model``          the exposure model: cosmic rays, showers, drift, EMI, the raw ramps
``references``     the reference files describing that detector
``crds_cache``     mappings, ``pars-*`` files and config of the offline CRDS cache
``level1b``        the ``*_uncal.fits`` writer
``truth``          the true rate and the catalogue of injected effects
``fitsio``         streamed FITS writing shared by the writers
``run``            :func:`simulate` itself: argument checks, output directory, manifest
=================  ===================================================================

The command line is ``streamdet simulate`` (``python -m streamdet.simulate`` runs it too).

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

from .crds_cache import NA_REFTYPES, PARS_STEPS, REFTYPES, SERVERLESS_URL, crds_env
from .params import LARGE_EVENT_RATES, SimParams, SimulationError
from .readout import (
    EMI_PIXEL_CLOCK_S,
    EMI_ROW_CLOCKS,
    EMI_SKIPPED_ROW_CLOCKS,
    FULL_SHAPE,
    N_REF_COLUMNS,
    SUBARRAYS,
    Subarray,
    emi_read_clocks,
)
from .run import SimResult, simulate

__all__ = [
    "EMI_PIXEL_CLOCK_S",
    "EMI_ROW_CLOCKS",
    "EMI_SKIPPED_ROW_CLOCKS",
    "FULL_SHAPE",
    "LARGE_EVENT_RATES",
    "NA_REFTYPES",
    "N_REF_COLUMNS",
    "PARS_STEPS",
    "REFTYPES",
    "SERVERLESS_URL",
    "SUBARRAYS",
    "Subarray",
    "SimParams",
    "SimResult",
    "SimulationError",
    "crds_env",
    "emi_read_clocks",
    "simulate",
]

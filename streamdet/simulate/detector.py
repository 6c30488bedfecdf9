"""The full-frame detector: pedestal, gain, noise, non-linearity, saturation, dark current
and bad pixels, drawn for the whole 1032 x 1024 frame from the seed's detector stream, so
that every subarray of one seed sees the same detector."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamdet.core.dqflags import PIXEL

from .params import SimParams
from .readout import FULL_SHAPE, N_REF_COLUMNS


@dataclass
class Detector:
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


def make_detector(p: SimParams, rng: np.random.Generator) -> Detector:
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
    mask_bits[:, refcol] = PIXEL["REFERENCE_PIXEL"]
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
    flat(mask_bits)[sets["dead"]] |= PIXEL["DEAD"] | PIXEL["DO_NOT_USE"]
    flat(qe)[sets["dead"]] = 0.0
    flat(mask_bits)[sets["hot"]] |= PIXEL["HOT"] | PIXEL["DO_NOT_USE"]
    lo, hi = p.hot_rate_dn_s
    flat(extra_rate)[sets["hot"]] = np.exp(rng.uniform(np.log(lo), np.log(hi), sets["hot"].size))
    flat(mask_bits)[sets["warm"]] |= PIXEL["WARM"]
    lo, hi = p.warm_rate_dn_s
    flat(extra_rate)[sets["warm"]] = np.exp(rng.uniform(np.log(lo), np.log(hi), sets["warm"].size))
    flat(mask_bits)[sets["low_qe"]] |= PIXEL["LOW_QE"]
    flat(qe)[sets["low_qe"]] = p.low_qe_factor
    flat(mask_bits)[sets["telegraph"]] |= PIXEL["OTHER_BAD_PIXEL"] | PIXEL["DO_NOT_USE"]
    flat(telegraph)[sets["telegraph"]] = True
    flat(no_lin)[sets["no_lin"]] = True
    flat(no_sat)[sets["no_sat"]] = True
    # Unreliable-dark flags may fall on any light-sensitive pixel (overlaps allowed).
    n_ud = round(p.unreliable_dark_fraction * light.size)
    flat(unreliable_dark)[light[rng.choice(light.size, size=n_ud, replace=False)]] = True

    return Detector(
        pedestal=pedestal, gain=gain,
        rn_fast=p.readnoise_cds_fast_dn * rn_pattern, rn_slow=p.readnoise_cds_slow_dn * rn_pattern,
        c2=c2, c3=c3, sat=sat, dark_rate=dark_rate, dark_amp=dark_amp, reset_amp=reset_amp,
        rscd_amp=rscd_amp, refcol=refcol, mask_bits=mask_bits, extra_rate=extra_rate, qe=qe,
        telegraph=telegraph, no_lin=no_lin, no_sat=no_sat, unreliable_dark=unreliable_dark,
    )

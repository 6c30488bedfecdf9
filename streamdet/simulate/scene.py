"""The scene: sky background and point sources in the subarray (DN/s)."""

from __future__ import annotations

import math

import numpy as np

from .detector import Detector
from .params import SimParams
from .readout import FULL_SHAPE, Subarray


def _pixel_psf_1d(n: int, center: float, sigma: float) -> np.ndarray:
    """Fraction of a 1-D Gaussian falling in each pixel 0..n-1 (pixel i spans i +- 0.5)."""
    edges = (np.arange(n + 1, dtype=np.float64) - 0.5 - center) / (math.sqrt(2.0) * sigma)
    cdf = 0.5 * (1.0 + np.array([math.erf(e) for e in edges]))
    return np.diff(cdf)



def make_scene(p: SimParams, sub: Subarray, det: Detector, t_ramp: float,
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

"""A quick-look PNG of an exposure (``streamdet demo``): the last group of integration 1
beside the rate image, each log-stretched.

The stretch is astropy.visualization's, applied to arrays (:func:`to_gray`) or, for the
streamdet-quicklook plugin's matplotlib figure, as a normalization
(:func:`log_normalization`); both take their limits from :func:`log_limits`. The PNG is written by
scikit-image (already a runtime dependency, for the shower search), so the demo needs
no matplotlib: the plugin's richer figure is there for those who install it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

#: the stretch's limits: percentiles of the finite values
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5


def log_limits(image: np.ndarray) -> tuple[float, float]:
    """The stretch's limits: the 1st and 99.5th percentiles of the finite values of
    ``image`` (astropy.visualization's interval), widened for a flat image."""
    from astropy.visualization import AsymmetricPercentileInterval

    finite = np.asarray(image, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    vmin, vmax = 0.0, 1.0
    if finite.size:
        vmin, vmax = AsymmetricPercentileInterval(LOW_PERCENTILE, HIGH_PERCENTILE).get_limits(finite)
    if not vmax > vmin:  # a flat image: any positive range shows it
        vmax = vmin + 1.0
    return float(vmin), float(vmax)


def log_normalization(image: np.ndarray):
    """An astropy ``ImageNormalize`` (a matplotlib ``Normalize``: needs matplotlib) for
    figures: logarithmic between :func:`log_limits`, clipped to [0, 1]."""
    from astropy.visualization import ImageNormalize, LogStretch

    vmin, vmax = log_limits(image)
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=LogStretch(), clip=True)


def to_gray(image: np.ndarray) -> np.ndarray:
    """``image`` log-stretched between :func:`log_limits` as 8-bit gray (NaN black): the
    same stretch as :func:`log_normalization`, without matplotlib."""
    from astropy.visualization import LogStretch

    image = np.asarray(image, dtype=np.float64)
    vmin, vmax = log_limits(image)
    scaled = LogStretch()(np.clip((image - vmin) / (vmax - vmin), 0.0, 1.0))
    return np.round(np.nan_to_num(scaled, nan=0.0) * 255).astype(np.uint8)


def write_png(path: Path, gray: np.ndarray) -> Path:
    """Write an 8-bit grayscale image with row 0 at the bottom, as astronomers display."""
    from skimage.io import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, np.ascontiguousarray(gray[::-1], dtype=np.uint8), check_contrast=False)
    return path


def write_quicklook(uncal: Path, rate: Path, path: Path) -> Path:
    # Level 1B SCI carries BZERO, which astropy will not memory-map scaled: read the
    # stored integers of the one plane needed and scale them here
    with fits.open(uncal, memmap=True, do_not_scale_image_data=True) as hdul:
        sci = hdul["SCI"]
        last_group = (np.array(sci.data[0, -1], dtype=np.float32) * float(sci.header.get("BSCALE", 1.0))
                      + float(sci.header.get("BZERO", 0.0)))
    rate_image = fits.getdata(rate, "SCI")
    gap = np.full((last_group.shape[0], 4), 255, np.uint8)
    return write_png(path, np.hstack([to_gray(last_group), gap, to_gray(rate_image)]))

"""A quick-look PNG of an exposure (``streamdet demo``): the last group of integration 1
beside the rate image, each log-stretched.

The stretch is astropy.visualization's, and :func:`log_normalization` is the one the
streamdet-quicklook plugin's matplotlib figure uses too. The PNG is written by
scikit-image (already a runtime dependency, for the shower search), so the demo needs
no matplotlib: the plugin's richer figure is there for those who install it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

#: the stretch's limits: percentiles of the finite values
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.5


def log_normalization(image: np.ndarray):
    """An astropy ``ImageNormalize``: logarithmic between the 1st and 99.5th
    percentiles of the finite values of ``image``, clipped to [0, 1] (NaN stays NaN)."""
    from astropy.visualization import AsymmetricPercentileInterval, ImageNormalize, LogStretch

    finite = np.asarray(image, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size:
        interval = AsymmetricPercentileInterval(LOW_PERCENTILE, HIGH_PERCENTILE)
        vmin, vmax = interval.get_limits(finite)
    else:
        vmin, vmax = 0.0, 1.0
    if not vmax > vmin:  # a flat image: any positive range shows it
        vmax = vmin + 1.0
    return ImageNormalize(vmin=float(vmin), vmax=float(vmax), stretch=LogStretch(), clip=True)


def to_gray(image: np.ndarray) -> np.ndarray:
    """``image`` through :func:`log_normalization` as 8-bit gray (NaN black)."""
    image = np.asarray(image, dtype=np.float64)
    scaled = np.asarray(log_normalization(image)(image), dtype=np.float64)
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

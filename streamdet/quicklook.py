"""A quick-look PNG of an exposure: the last group of integration 1 beside the rate
image, each log-scaled, written with the standard library alone (zlib + struct)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from astropy.io import fits


def _log_scale(image: np.ndarray) -> np.ndarray:
    """8-bit log stretch between the 1st and 99.5th percentiles of the finite values."""
    image = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, np.uint8)
    lo, hi = np.percentile(image[finite], [1.0, 99.5])
    scaled = np.clip((np.where(finite, image, lo) - lo) / max(hi - lo, 1e-12), 0, 1)
    scaled = np.log10(1 + 999 * scaled) / 3.0
    return (scaled * 255).astype(np.uint8)


def write_png(path: Path, gray: np.ndarray) -> Path:
    """Write an 8-bit grayscale image (row 0 at the bottom, as astronomers display)."""
    gray = np.ascontiguousarray(gray[::-1], dtype=np.uint8)
    height, width = gray.shape
    raw = b"".join(b"\x00" + gray[y].tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
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
    return write_png(path, np.hstack([_log_scale(last_group), gap, _log_scale(rate_image)]))

"""Streamed FITS writing: extensions appended a plane at a time, so that large exposures
and references are never held in memory whole."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from astropy.io import fits


def raw_to_fits_int16(plane_u16: np.ndarray) -> np.ndarray:
    """uint16 values -> the big-endian int16 that FITS stores with BZERO = 32768."""
    return (plane_u16 ^ np.uint16(0x8000)).astype(">u2").view(">i2")


def float_to_fits(plane: np.ndarray) -> np.ndarray:
    return np.asarray(plane, dtype=">f4")


def image_header(extname: str, bitpix: int, shape: tuple[int, ...], bzero: int | None = None
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


def stream_image(path: Path, header: fits.Header, planes: Iterator[np.ndarray]) -> None:
    """Append an IMAGE extension to ``path``, writing its data plane by plane."""
    shdu = fits.StreamingHDU(str(path), header)
    try:
        for plane in planes:
            shdu.write(np.ascontiguousarray(plane))
    finally:
        shdu.close()


def append_hdus(path: Path, hdus: list) -> None:
    """Append extensions to an existing FITS file without reading its data."""
    with fits.open(path, mode="append") as hdul:
        for hdu in hdus:
            hdul.append(hdu)


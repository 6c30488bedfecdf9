"""FITS has no unsigned integers wider than a byte: it stores uint16 and uint32 as the
signed integers of the same width offset by BZERO = 2**(bits - 1), which is the value's
top bit flipped. The one place streamdet converts between the two without going through
astropy (the product scratch files, the reference DQ arrays); the band threads' C
conversion (``_ckernels/scratch.c``) flips the same bit."""

from __future__ import annotations

import numpy as np


def offset_signed(dtype) -> bool:
    """Whether FITS stores ``dtype`` as signed with a BZERO offset."""
    dtype = np.dtype(dtype)
    return dtype.kind == "u" and dtype.itemsize > 1


def bzero(dtype) -> int:
    """The BZERO of an offset-signed ``dtype``."""
    return 1 << (8 * np.dtype(dtype).itemsize - 1)


def stored_dtype(dtype) -> np.dtype:
    """How FITS stores ``dtype``: big-endian, unsigned as signed."""
    dtype = np.dtype(dtype)
    return np.dtype(f">{'i' if offset_signed(dtype) else dtype.kind}{dtype.itemsize}")


def to_stored(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` (as ``dtype``) in the form FITS stores them (:func:`stored_dtype`)."""
    dtype = np.dtype(dtype)
    values = np.asarray(values, dtype=dtype)
    if not offset_signed(dtype):
        return values.astype(stored_dtype(dtype))
    flipped = values ^ np.array(bzero(dtype), dtype)
    return flipped.astype(dtype.newbyteorder(">")).view(stored_dtype(dtype))


def from_stored(stored: np.ndarray, dtype) -> np.ndarray:
    """The native ``dtype`` values of ``stored``, signed integers of the same width in
    either byte order, offset by :func:`bzero` (``stored + BZERO`` exactly)."""
    dtype = np.dtype(dtype)
    unsigned = stored.view(stored.dtype.str.replace("i", "u"))  # same byte order
    # to native order first: numpy's bitwise ops on swapped arrays go through buffers
    out = unsigned.astype(dtype)
    np.bitwise_xor(out, np.array(bzero(dtype), dtype), out=out)
    return out

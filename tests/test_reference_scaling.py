"""Scaled reference arrays (reference_files ``_scaled``): a DQ array is stored as int32
with BZERO = 2**31; its values must come out as astropy reads them, top bit included."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.reference_files import _scaled


@pytest.mark.parametrize("dtype", [np.uint32, np.uint16])
def test_unsigned_stored_signed_come_back_as_astropy_reads_them(tmp_path, dtype):
    rng = np.random.default_rng(7)
    top = np.iinfo(dtype).max
    values = rng.integers(0, top, size=(30, 40), dtype=np.uint64).astype(dtype)
    values.flat[:4] = [0, top, top // 2, top // 2 + 1]  # either side of the offset
    path = tmp_path / "dq.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(values, name="DQ")]).writeto(path)
    with fits.open(path, do_not_scale_image_data=True) as raw, fits.open(path) as scaled:
        stored, header = raw["DQ"].data, raw["DQ"].header
        assert stored.dtype.kind == "i" and header["BZERO"] > 0  # as FITS stores them
        got = _scaled(stored, header.get("BSCALE", 1.0), header["BZERO"], dtype)
        assert got.dtype == dtype and got.dtype.isnative
        np.testing.assert_array_equal(got, scaled["DQ"].data)
        np.testing.assert_array_equal(got, values)
        # other scalings keep the general formula
        halves = _scaled(stored, 0.5, 0.0, np.float32)
        np.testing.assert_array_equal(halves, (stored.astype(np.float64) * 0.5).astype(np.float32))

"""Reference DQ arrays as stored and as decoded. Scaled arrays (reference_files
``_scaled``): a DQ array is stored as int32 with BZERO = 2**31; its values must come out
as astropy reads them, top bit included. DQ_DEF decoding (dqflags
``decode_with_dq_def``): each bit the table names goes to that JWST flag."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.dqflags import PIXEL, decode_with_dq_def
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


def test_dq_def_bits_go_to_the_flags_they_name():
    rng = np.random.default_rng(5)
    dq = rng.integers(0, 2**32, size=(40, 50), dtype=np.uint64).astype(np.uint32)
    # bits numbered as JWST numbers them, bits moved elsewhere, two bits onto one flag,
    # a name that is no JWST flag, and GOOD (no bit)
    table = [(0, "DO_NOT_USE"), (1, "SATURATED"), (9, "NO_GAIN_VALUE"), (4, "HOT"),
             (5, "HOT"), (7, "NOT_A_FLAG"), (3, "GOOD"), (31, "REFERENCE_PIXEL"),
             (30, "dead ")]
    dq_def = np.array(table, dtype=[("BIT", "i4"), ("NAME", "U20")])
    expected = np.zeros_like(dq)
    for bit, name in table:
        value = PIXEL.get(name.strip().upper())
        if value:
            expected |= np.where(dq & np.uint32(1 << bit), np.uint32(value), np.uint32(0))
    got = decode_with_dq_def(dq, dq_def)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, expected)
    assert (got & np.uint32(PIXEL["HOT"])).any() and not (got & np.uint32(1 << 7)).any()
    np.testing.assert_array_equal(decode_with_dq_def(dq, None), dq)  # JWST values already

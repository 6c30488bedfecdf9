"""CubeStore: the scratch files that hold rateints and saved ramps in FITS form, so that
writing a product copies their bytes. Bands put in, planes read back and replaced, and
the bytes copied out must be exactly what astropy writes for the same arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.products import CubeStore, RateArrays


def _rateints(rng, shape):
    """Rateints-like arrays with the awkward values: NaN, infinities, negative zero, DQ
    with the top bit set (FITS stores uint32 as int32 with BZERO)."""
    sci = rng.normal(size=shape).astype(np.float32)
    sci.flat[::7] = np.nan
    sci.flat[1::11] = -0.0
    sci.flat[2::13] = np.inf
    dq = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    dq.flat[::5] = 2**31
    dq.flat[1::5] = 2**32 - 1
    return RateArrays(sci, -sci, dq, sci * 2, sci * 3)


def _filled(shape, arrays, tmp_path, bands=(slice(0, 3), slice(3, 4), slice(4, 9))):
    store = CubeStore(shape, tmp_path)
    for rows in bands:  # as the band pass puts them: every integration, a band of rows
        store.put(np.s_[:, rows], RateArrays(*(a[:, rows] for a in arrays.arrays())))
    return store


def test_bands_put_come_back_as_planes(tmp_path):
    rng = np.random.default_rng(1)
    arrays = _rateints(rng, (4, 9, 5))
    store = _filled((4, 9, 5), arrays, tmp_path)
    try:
        for k, array in enumerate(arrays.arrays()):
            for i in range(4):
                plane = store.plane(k, i)
                assert plane.dtype == array.dtype and plane.dtype.isnative
                np.testing.assert_array_equal(plane.view(np.uint8), array[i].view(np.uint8))
    finally:
        store.close()


def test_a_plane_written_back_replaces_that_plane_only(tmp_path):
    rng = np.random.default_rng(2)
    arrays = _rateints(rng, (3, 9, 5))
    store = _filled((3, 9, 5), arrays, tmp_path)
    try:
        new = np.arange(45, dtype=np.uint32).reshape(9, 5) + np.uint32(2**31 - 20)
        store.write_plane(2, 1, new)
        np.testing.assert_array_equal(store.plane(2, 1), new)
        np.testing.assert_array_equal(store.plane(2, 0), arrays.dq[0])
        np.testing.assert_array_equal(store.plane(2, 2), arrays.dq[2])
    finally:
        store.close()


def test_one_integration_of_a_saved_ramp_goes_where_it_belongs(tmp_path):
    """A saved ramp's store (``[nints, ngroups, ny, nx]``) takes one integration's band
    of rows at a time from a view of a taller band buffer, as the integration pass
    hands it."""
    rng = np.random.default_rng(3)
    ramp = rng.normal(size=(2, 4, 9, 5)).astype(np.float32)
    groupdq = rng.integers(0, 256, size=ramp.shape, dtype=np.uint8)
    store = CubeStore(ramp.shape, tmp_path, extensions=(("SCI", np.float32), ("GROUPDQ", np.uint8)))
    try:
        for i in range(2):
            for rows in (slice(0, 4), slice(4, 9)):
                buffer = np.zeros((4, 9 + 2, 5), np.float32)  # a band with halo rows
                buffer[:, 1 + rows.start:1 + rows.stop] = ramp[i, :, rows]
                view = buffer[:, 1 + rows.start:1 + rows.stop]
                store.put(np.s_[i, :, rows], (view, groupdq[i, :, rows]))
        for i in range(2):
            np.testing.assert_array_equal(store.plane(0, i), ramp[i])
            np.testing.assert_array_equal(store.plane(1, i), groupdq[i])
    finally:
        store.close()


@pytest.mark.parametrize("scratch_on", ["same", "tmpfs"])
def test_bytes_copied_out_are_what_astropy_writes(tmp_path, scratch_on):
    """The store's bytes, copied to a file, are the data astropy writes for the arrays
    (big-endian; uint32 as int32 with BZERO). With the scratch files on another file
    system (tmpfs) the kernel may refuse the copy: the bytes are then read and written."""
    if scratch_on == "tmpfs":
        if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("no tmpfs beside the test directory")
        scratch = Path("/dev/shm")
    else:
        scratch = tmp_path
    rng = np.random.default_rng(4)
    arrays = _rateints(rng, (3, 9, 5))
    store = _filled((3, 9, 5), arrays, scratch)
    try:
        for k, array in enumerate(arrays.arrays()):
            reference = tmp_path / f"astropy{k}.fits"
            fits.ImageHDU(array).writeto(reference)  # a primary HDU, then the image
            with fits.open(reference) as hdul:
                start = hdul[1]._data_offset
            copied = tmp_path / f"copied{k}"
            fd = os.open(copied, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.write(fd, b"x" * 7)  # the copy lands at the offset given
                assert store.copy_into(k, fd, 7) == array.nbytes
            finally:
                os.close(fd)
            data = copied.read_bytes()
            assert data[:7] == b"x" * 7
            with open(reference, "rb") as f:
                f.seek(start)
                assert data[7:] == f.read(array.nbytes), RateArrays.EXTENSIONS[k]
    finally:
        store.close()

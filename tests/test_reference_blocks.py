"""Reference blocks read for a few columns (``References.block(columns=...)``, what a
pass for the surveys alone asks for) hold the same values as the whole rows' block cut
to those columns: NaN zeroed or kept, a subarray's window, cached or not."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core import references as refmod
from streamdet.core.exposure import Exposure
from streamdet.simulate import simulate


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("blocks"), subarray="SUB64", ngroups=4, nints=1)


@pytest.mark.parametrize("nan_to_zero", [True, False])
@pytest.mark.parametrize("cache", [False, True])
def test_a_few_columns_are_the_whole_rows_cut(sim, tmp_path, nan_to_zero, cache):
    rng = np.random.default_rng(3)
    dark = rng.normal(5, 2, size=(2, 6, 1024, 1032)).astype(np.float32)
    dark[rng.random(dark.shape) < 0.1] = np.nan
    path = tmp_path / "dark.fits"
    hdr = fits.Header({"REFTYPE": "DARK", "INSTRUME": "MIRI", "SUBARRAY": "FULL"})
    fits.HDUList([fits.PrimaryHDU(header=hdr), fits.ImageHDU(dark, name="SCI")]).writeto(path)
    with Exposure(sim.uncal) as exposure:
        meta = exposure.meta
        refs = refmod.References(meta, refmod.resolve(meta, ["dark"], {"dark": str(path)}))
        try:
            columns = np.array([0, 1, 5, 40, meta.nx - 1])
            rows = slice(3, 17)
            for index in [(1, slice(0, 4)), (0, slice(None)), (1, 2)]:
                whole = refs.block("dark", "SCI", index=index, rows=rows,
                                   nan_to_zero=nan_to_zero)[..., columns]
                got = refs.block("dark", "SCI", index=index, rows=rows,
                                 nan_to_zero=nan_to_zero, cache=cache, columns=columns)
                assert got.dtype == np.float32 and got.shape == whole.shape
                np.testing.assert_array_equal(got, whole)
                # and the file's own values, through the subarray's window
                y0, x0 = meta.substrt2 - 1, meta.substrt1 - 1
                stored = dark[index][..., y0 + 3:y0 + 17, :][..., x0 + columns]
                expected = np.where(np.isnan(stored), 0, stored) if nan_to_zero else stored
                np.testing.assert_array_equal(got, expected)
                assert nan_to_zero or np.isnan(got).any()
        finally:
            refs.close()

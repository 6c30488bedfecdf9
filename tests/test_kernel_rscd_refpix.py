"""Kernels of the rscd and refpix steps: hand-made cases and parity with jwst 3.0.

Parity tests run jwst's own functions (``jwst.rscd.rscd_sub.do_correction`` and
``jwst.refpix.reference_pixels.correct_model``) on in-memory RampModels built from the
same seeded arrays.  Tolerance: DQ bit-identical, data bit-identical (0 ulp; NaN where
jwst has NaN).
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from streamdet.core import dqflags
from streamdet.algorithms import refpix as rp
from streamdet.algorithms import rscd

SAT = dqflags.SATURATED
DNU = dqflags.DO_NOT_USE
FLUX_EST = dqflags.FLUX_ESTIMATED
REFPIX = dqflags.REFERENCE_PIXEL

RSCD_KEYWORDS = {
    "INT1SKIP": "ngroups_skip_int1", "INT2SKIP": "ngroups_skip_int2p",
    "INT1UGP1": "keep_bright_firstgroup_int1", "INT2UGP1": "keep_bright_firstgroup_int2p",
    "INT1BORS": "keep_groups_saturation_int1", "INT2BORS": "keep_groups_saturation_int2p",
}


def _skip_table(rows):
    return np.array(rows, dtype=[("subarray", "S17"), ("readpatt", "S12"),
                                 ("group_skip1", "i4"), ("group_skip", "i4")])


TABLE = _skip_table([
    ("FULL", "FASTR1", 3, 4),
    ("BRIGHTSKY", "FASTR1", 2, 5),
    ("SUB128", "FASTR1", 3, 6),
    ("SUB128", "SLOWR1", 1, 2),
    ("SLITLESSPRISM", "FASTR1", 4, 3),
    ("SUB64", "FASTR1", -1, 3),
    ("SUB256", "FASTR1", 0, 0),
    ("SUB128", "FASTR1", 9, 9),   # shadowed by the earlier SUB128/FASTR1 row
])


# ---------------------------------------------------------------------------------------
# rscd: hand-made
# ---------------------------------------------------------------------------------------

def test_group_skips_lookup_rules():
    assert rscd.group_skips_for(TABLE, "FULL", "FASTR1", 20) == (3, 4)
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 20) == (3, 6)  # first row wins
    assert rscd.group_skips_for(TABLE, "SUB128", "SLOWR1", 20) == (1, 2)
    assert rscd.group_skips_for(TABLE, "SUBPRISM", "FASTR1", 20) == (4, 3)  # old name
    assert rscd.group_skips_for(TABLE, "sub128", "FASTR1", 20) is None  # exact match
    assert rscd.group_skips_for(TABLE, "MASK1550", "FASTR1", 20) is None
    assert rscd.group_skips_for(TABLE, "SUB64", "FASTR1", 20) == (1, 3)  # old layout
    # ngroups <= 5: one group everywhere
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 5) == (1, 1)
    assert rscd.group_skips_for(TABLE, "SUB256", "FASTR1", 4) == (1, 1)
    # a count leaving fewer than 3 groups drops to ngroups - 3
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 8) == (3, 5)
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 6) == (3, 3)
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 4) == (1, 1)
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 3) == (0, 0)
    # too few groups
    assert rscd.group_skips_for(TABLE, "SUB128", "FASTR1", 2) is None
    plan = rscd.plan_rscd(TABLE, "NOPE", "FASTR1", 10)
    assert plan.status == "SKIPPED" and "not found" in plan.messages[0]


def test_group_skips_from_astropy_table_and_fits_names():
    t = Table(TABLE)
    assert rscd.group_skips_for(t, "BRIGHTSKY", "FASTR1", 30) == (2, 5)
    t.rename_columns(t.colnames, [c.upper() for c in t.colnames])
    assert rscd.group_skips_for(t, "BRIGHTSKY", "FASTR1", 30) == (2, 5)
    padded = _skip_table([("FULL     ", "FASTR1  ", 2, 3)])
    assert rscd.group_skips_for(padded, "FULL", "FASTR1", 30) == (2, 3)


def test_rscd_backoff_by_hand():
    ngroups, ny, nx = 10, 1, 6
    gdq = np.zeros((1, ngroups, ny, nx), np.uint8)
    first_sat = [99, 5, 4, 3, 1, 0]  # 99: never saturates
    for x, f in enumerate(first_sat):
        gdq[0, min(f, ngroups):, 0, x] |= SAT
    pdq = np.zeros((ny, nx), np.uint32)
    tally = rscd.flag_rscd_groups(gdq, pdq, np.array([3]), 1, 3)
    dropped = [(gdq[0, :, 0, x] & DNU != 0).sum() for x in range(nx)]
    # n=3: min(n, max(first_sat - 2, 0)), except saturation at group 0: full count
    assert dropped == [3, 3, 2, 1, 0, 3]
    assert list(pdq[0] & FLUX_EST != 0) == [False, False, True, True, True, False]
    assert tally.header_keywords(exposure_nints=5) == {"INT2SKIP": 3, "INT2UGP1": 1,
                                                       "INT2BORS": 3}


def test_rscd_first_integration_is_absolute_index_zero():
    gdq = np.zeros((2, 8, 2, 2), np.uint8)
    pdq = np.zeros((2, 2), np.uint32)
    rscd.flag_rscd_groups(gdq, pdq, np.array([0, 1]), 1, 4)
    assert (gdq[0, :1] == DNU).all() and (gdq[0, 1:] == 0).all()
    assert (gdq[1, :4] == DNU).all() and (gdq[1, 4:] == 0).all()
    gdq[:] = 0
    tally = rscd.flag_rscd_groups(gdq, pdq, np.array([57, 58]), 1, 4)
    assert (gdq[:, :4] == DNU).all() and (gdq[:, 4:] == 0).all()
    assert tally.header_keywords(exposure_nints=60) == {"INT2SKIP": 4, "INT2UGP1": 0,
                                                        "INT2BORS": 0}


# ---------------------------------------------------------------------------------------
# rscd: parity with jwst
# ---------------------------------------------------------------------------------------

def _saturating_groupdq(rng, nints, ngroups, ny, nx):
    """Cumulative SATURATED flags with a 3x3 grow, as the saturation step leaves them,
    plus DO_NOT_USE from a mask on a few pixels."""
    from scipy.ndimage import binary_dilation

    first = np.full((nints, ny, nx), 999)
    bright = rng.random((nints, ny, nx)) < 0.04
    first[bright] = rng.integers(0, ngroups, bright.sum())
    gdq = np.zeros((nints, ngroups, ny, nx), np.uint8)
    for i in range(nints):
        for g in range(ngroups):
            plane = binary_dilation(first[i] <= g, structure=np.ones((3, 3), bool))
            gdq[i, g][plane] |= SAT
    bad = rng.random((ny, nx)) < 0.01
    gdq[:, :, bad] |= DNU
    gdq[rng.random(gdq.shape) < 0.001] |= dqflags.JUMP_DET
    return gdq


def _jwst_rscd(gdq, pdq, subarray, readpatt, table, exposure_nints, int_start):
    from stdatamodels.jwst.datamodels import RampModel, RSCDModel
    from jwst.rscd import rscd_sub

    nints, ngroups, ny, nx = gdq.shape
    model = RampModel(data=np.zeros(gdq.shape, np.float32), groupdq=gdq.copy(),
                      pixeldq=pdq.copy())
    model.meta.instrument.name = "MIRI"
    model.meta.instrument.detector = "MIRIMAGE"
    model.meta.subarray.name = subarray
    model.meta.exposure.readpatt = readpatt
    model.meta.exposure.ngroups = ngroups
    model.meta.exposure.nints = exposure_nints
    model.meta.exposure.integration_start = int_start
    ref = RSCDModel()
    ref.rscd_group_skip_table = table
    out = rscd_sub.do_correction(model, ref)
    keywords = {k: getattr(out.meta.rscd, attr) for k, attr in RSCD_KEYWORDS.items()}
    keywords = {k: int(v) for k, v in keywords.items() if v is not None}
    return out.groupdq, out.pixeldq, out.meta.cal_step.rscd, keywords


def _ours_rscd(gdq, pdq, subarray, readpatt, table, exposure_nints, int_start, stream):
    gdq = gdq.copy()
    pdq = pdq.copy()
    plan = rscd.plan_rscd(table, subarray, readpatt, gdq.shape[1])
    if not plan.applies:
        return gdq, pdq, "SKIPPED", {}
    first_abs = (int_start or 1) - 1
    int_index = np.arange(first_abs, first_abs + gdq.shape[0])
    tally = rscd.RscdTally(plan.skip_first_int, plan.skip_later_ints)
    if stream:
        for k in range(gdq.shape[0]):
            rscd.flag_rscd_groups(gdq[k:k + 1], pdq, int_index[k:k + 1],
                                  plan.skip_first_int, plan.skip_later_ints, tally)
    else:
        rscd.flag_rscd_groups(gdq, pdq, int_index, plan.skip_first_int,
                              plan.skip_later_ints, tally)
    return gdq, pdq, "COMPLETE", tally.header_keywords(exposure_nints)


RSCD_CASES = [
    # subarray, readpatt, ny, nx, nints, ngroups, exposure nints, INTSTART
    ("SUB128", "FASTR1", 128, 136, 3, 12, 3, None),
    ("BRIGHTSKY", "FASTR1", 512, 864, 3, 10, 3, None),
    ("SUB128", "FASTR1", 128, 136, 3, 12, 10, 6),    # later segment: int_index 5..7
    ("SUB128", "FASTR1", 128, 136, 3, 12, 10, 1),    # first segment of 10
    ("SUB128", "FASTR1", 64, 72, 1, 12, 4, 1),       # first segment holding one int
    ("SUB128", "FASTR1", 64, 72, 1, 12, 1, None),    # single integration
    ("SUB128", "FASTR1", 64, 72, 3, 5, 3, None),     # ngroups <= 5
    ("SUB128", "FASTR1", 64, 72, 3, 7, 3, None),     # clamped to ngroups - 3
    ("SUB128", "FASTR1", 64, 72, 3, 3, 3, None),     # clamped to 0 groups
    ("SUBPRISM", "FASTR1", 64, 72, 2, 10, 2, None),  # renamed subarray
    ("SUB64", "FASTR1", 64, 72, 2, 10, 2, None),     # negative group_skip1
    ("SUB256", "FASTR1", 64, 72, 3, 10, 3, None),    # zero groups to drop
    ("MASK1065", "FASTR1", 64, 72, 2, 10, 2, None),  # not in the table
    ("SUB128", "FASTR1", 64, 72, 2, 2, 2, None),     # too few groups
]


@pytest.mark.parity
@pytest.mark.parametrize("case", RSCD_CASES, ids=lambda c: f"{c[0]}-{c[4]}x{c[5]}-{c[7]}")
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "batch"])
def test_rscd_parity(case, stream):
    subarray, readpatt, ny, nx, nints, ngroups, exp_nints, int_start = case
    rng = np.random.default_rng(abs(hash(case)) % 2**32)
    gdq = _saturating_groupdq(rng, nints, ngroups, ny, nx)
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[rng.random((ny, nx)) < 0.02] |= FLUX_EST | DNU
    ref = _jwst_rscd(gdq, pdq, subarray, readpatt, TABLE, exp_nints, int_start)
    ours = _ours_rscd(gdq, pdq, subarray, readpatt, TABLE, exp_nints, int_start, stream)
    assert ours[2] == ref[2]
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    assert ours[3] == ref[3]
    if ngroups > 5 and ours[2] == "COMPLETE" and subarray == "SUB128" and nints == 3:
        assert ref[3].get("INT2BORS", 0) > 0  # the back-off really was exercised


# ---------------------------------------------------------------------------------------
# refpix: hand-made
# ---------------------------------------------------------------------------------------

def test_refpix_applies_to_full_frame_only():
    assert rp.applies_to(1024, 1032).applies
    sub = rp.applies_to(512, 864)
    assert not sub.applies and sub.status == "SKIPPED" and "subarray" in sub.message
    assert not rp.applies_to(1024, 1028).applies
    assert not rp.applies_to(256, 1032).applies


def test_refpix_removes_constant_amplifier_offsets_exactly():
    rng = np.random.default_rng(3)
    ngroups, ny, nx = 4, 16, 24
    scene = rng.integers(0, 2000, (ny, nx)).astype(np.float32)
    scene[:, :4] = 0
    scene[:, -4:] = 0
    offsets = rng.integers(-300, 300, (ngroups, 2, 4)).astype(np.float32)
    data = np.empty((1, ngroups, ny, nx), np.float32)
    for g in range(ngroups):
        pattern = np.tile(offsets[g], (ny // 2, nx // 4))
        data[0, g] = 10000 + g * scene + pattern
    pdq = np.full((ny, nx), 0, np.uint32)
    pdq[:, :4] |= REFPIX
    pdq[:, -4:] |= REFPIX
    out = rp.subtract_reference_drift(data, pdq)
    assert out.corrected and not out.warnings
    base = np.tile(offsets[0], (ny // 2, nx // 4))
    for g in range(ngroups):
        np.testing.assert_array_equal(data[0, g], 10000 + g * scene + base)


def test_refpix_unusable_reference_column_leaves_data():
    rng = np.random.default_rng(4)
    data = rng.normal(12000, 50, (2, 3, 8, 16)).astype(np.float32)
    before = data.copy()
    pdq = np.zeros((8, 16), np.uint32)
    pdq[1::2, 14] = DNU  # amplifier C, right side, rows 1, 3, ...
    out = rp.subtract_reference_drift(data, pdq)
    assert not out.corrected
    assert any("Even rows for amplifier C" in w for w in out.warnings)
    np.testing.assert_array_equal(data, (before - before[:, :1]) + before[:, :1])


# ---------------------------------------------------------------------------------------
# refpix: parity with jwst (MIRI full frame)
# ---------------------------------------------------------------------------------------

def _miri_frames(rng, nints, ngroups, ny=1024, nx=1032, pedestal=14000.0):
    """Ramps with a pedestal, a sky + source scene, per-amplifier offsets and drifts
    differing between even and odd rows, read noise and outliers in reference columns."""
    cols = np.arange(nx)
    rows = np.arange(ny)
    scene = rng.gamma(2.0, 40.0, (ny, nx)).astype(np.float32)
    scene[:, :4] = 0
    scene[:, -4:] = 0
    data = np.empty((nints, ngroups, ny, nx), np.float32)
    for i in range(nints):
        amp_offset = rng.normal(0, 80, 4)
        for g in range(ngroups):
            drift = rng.normal(0, 6, (2, 4)) + g * np.array([[1.5, -2.0, 0.7, 3.1],
                                                            [-0.4, 2.2, 1.1, -1.7]])
            pattern = amp_offset[cols % 4][None, :] + drift[rows % 2][:, cols % 4]
            noise = rng.normal(0, 4.0, (ny, nx))
            data[i, g] = pedestal + g * scene + pattern + noise
        spikes = rng.random((ngroups, ny, 8)) < 0.01
        refcols = np.r_[0:4, nx - 4:nx]
        ref = data[i][:, :, refcols]
        ref[spikes] += rng.normal(0, 400, spikes.sum())
        data[i][:, :, refcols] = ref
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[:, :4] |= REFPIX
    pdq[:, -4:] |= REFPIX
    pick = rng.integers(0, ny, 40)
    pdq[pick, rng.integers(0, 4, 40)] |= DNU
    pdq[pick, nx - 1 - rng.integers(0, 4, 40)] |= DNU
    pdq[rng.random((ny, nx)) < 0.01] |= DNU
    return data, pdq


def _jwst_refpix(data, pdq, odd_even_rows=True, siglimit=3.0):
    from stdatamodels.jwst.datamodels import RampModel
    from jwst.refpix import reference_pixels

    nints, ngroups, ny, nx = data.shape
    model = RampModel(data=data.copy(), groupdq=np.zeros(data.shape, np.uint8),
                      pixeldq=pdq.copy())
    model.meta.instrument.name = "MIRI"
    model.meta.instrument.detector = "MIRIMAGE"
    model.meta.subarray.name = "FULL" if (ny, nx) == (1024, 1032) else "BRIGHTSKY"
    model.meta.subarray.xstart = 1
    model.meta.subarray.ystart = 1
    model.meta.subarray.xsize = nx
    model.meta.subarray.ysize = ny
    model.meta.exposure.noutputs = 4
    model.meta.exposure.zero_frame = False
    conv = {"refpix_algorithm": "median", "sirs_kernel_model": None, "sigreject": 4.0,
            "gaussmooth": 1.0, "halfwidth": 30}
    status = reference_pixels.correct_model(model, True, True, 11, 1.0, odd_even_rows,
                                            conv, siglimit)
    return model.data, model.pixeldq, status


def _check_same(ours, theirs):
    np.testing.assert_array_equal(ours, theirs)  # bit-identical; NaN matches NaN
    finite = np.isfinite(theirs)
    assert np.array_equal(np.isfinite(ours), finite)


@pytest.mark.parity
@pytest.mark.parametrize("nints,ngroups,stream,pedestal",
                         [(2, 5, True, 14000.0), (1, 4, False, 0.0)])
def test_refpix_parity_full_frame(nints, ngroups, stream, pedestal):
    # without a pedestal the float32 grid is fine enough to show the float64 fallback
    rng = np.random.default_rng(11 + nints)
    data, pdq = _miri_frames(rng, nints, ngroups, pedestal=pedestal)
    # a reference column whose usable pixels are all equal after group-0 subtraction:
    # jwst's float64 fallback mean (amplifier C, right side, odd rows, group 2)
    data[0, 0, 1::2, 1030] = np.round(data[0, 0, 1::2, 1030])
    data[0, 2, 1::2, 1030] = data[0, 0, 1::2, 1030] + np.float32(1000.25)
    theirs, their_pdq, status = _jwst_refpix(data, pdq)
    assert status == 0
    ours = data.copy()
    our_pdq = pdq.copy()
    if stream:
        for i in range(nints):
            out = rp.subtract_reference_drift(ours[i:i + 1], our_pdq)
    else:
        out = rp.subtract_reference_drift(ours, our_pdq)
    assert out.corrected
    _check_same(ours, theirs)
    np.testing.assert_array_equal(our_pdq, their_pdq)
    np.testing.assert_array_equal(ours[:, 0], data[:, 0])
    # the drift really was removed: reference pixels end up near group 0
    good = (pdq[:, :4] & DNU) == 0
    resid = (ours[:, -1, :, :4] - data[:, 0, :, :4])[:, good]
    assert abs(np.median(resid)) < 5


@pytest.mark.parity
@pytest.mark.parametrize("odd_even_rows,siglimit", [(False, 3.0), (True, 2.0)])
def test_refpix_parity_parameters(odd_even_rows, siglimit):
    rng = np.random.default_rng(21)
    data, pdq = _miri_frames(rng, 1, 3)
    theirs, _, _ = _jwst_refpix(data, pdq, odd_even_rows, siglimit)
    ours = data.copy()
    rp.subtract_reference_drift(ours, pdq.copy(), odd_even_rows=odd_even_rows,
                                siglimit=siglimit)
    _check_same(ours, theirs)


@pytest.mark.parity
def test_refpix_parity_unusable_and_nan_reference_pixels():
    rng = np.random.default_rng(31)
    data, pdq = _miri_frames(rng, 1, 3)
    # make data - g0 round in float32 so that the group-0 round trip is visible
    data[0, 1:, 100:110, 100:110] = rng.normal(0, 1e-3, (2, 10, 10)).astype(np.float32)
    data[0, 0, 100:110, 100:110] = rng.normal(3e4, 10, (10, 10)).astype(np.float32)
    bad = pdq.copy()
    bad[:, 2] |= DNU  # the whole left column of amplifier C
    theirs, _, status = _jwst_refpix(data, bad)
    ours = data.copy()
    out = rp.subtract_reference_drift(ours, bad.copy())
    assert status == 0 and not out.corrected
    _check_same(ours, theirs)
    assert not np.array_equal(ours[0, 1:, 100:110, 100:110], data[0, 1:, 100:110, 100:110])

    nan = data.copy()
    nan[0, 2, 10, 1029] = np.nan  # amplifier B, right side, even row index 10
    nan[0, 0, 20, 500] = np.inf   # non-finite group 0
    theirs, _, _ = _jwst_refpix(nan, pdq)
    ours = nan.copy()
    with np.errstate(invalid="ignore"):
        rp.subtract_reference_drift(ours, pdq.copy())
    _check_same(ours, theirs)
    assert np.isnan(ours[0, 2, ::2, 1::4]).all()


@pytest.mark.parity
def test_refpix_subarray_skipped_like_jwst():
    data = np.ones((1, 2, 512, 864), np.float32)
    _, _, status = _jwst_refpix(data, np.zeros((512, 864), np.uint32))
    from jwst.refpix import reference_pixels

    assert status == reference_pixels.SUBARRAY_SKIPPED
    assert not rp.applies_to(512, 864).applies

"""Array kernels of dq_init, saturation, firstframe, lastframe, reset, linearity and
dark_current: hand-worked cases, and parity with jwst 3.0 / stcal on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest

from streamdet.core.dqflags import (
    AD_FLOOR, DO_NOT_USE, FLUX_ESTIMATED, HOT, NO_LIN_CORR, NO_SAT_CHECK, NONLINEAR,
    REFERENCE_PIXEL, SATURATED, UNRELIABLE_DARK,
)
from streamdet.algorithms.dark_current import (
    average_dark_current, combined_dark_dq, dark_int_for, subtract_dark,
)
from streamdet.algorithms.dq_init import apply_mask
from streamdet.algorithms.firstframe import flag_first_group
from streamdet.algorithms.lastframe import flag_last_group
from streamdet.algorithms.linearity import correct_linearity, prepare_linearity_reference
from streamdet.algorithms.reset import reset_int_for, subtract_reset
from streamdet.algorithms.saturation import flag_saturation, grow_mask

NY, NX = 64, 72


# ---------------------------------------------------------------- synthetic MIRI data
def miri_ramp(rng, nints=2, ngroups=10, ny=NY, nx=NX, sat_level=60000.0):
    """Integer-valued raw DN ramps: ~12 kDN pedestal, a spread of slopes, some pixels
    crossing ``sat_level`` part-way, a few at or below zero."""
    pedestal = rng.normal(12000, 800, (ny, nx))
    slope = rng.gamma(1.5, 150.0, (ny, nx))
    bright = rng.random((ny, nx)) < 0.04
    slope[bright] = rng.uniform(3000, 12000, bright.sum())
    groups = np.arange(1, ngroups + 1)[None, :, None, None]
    ramp = pedestal + slope * groups + rng.normal(0, 8, (nints, ngroups, ny, nx))
    ramp = np.minimum(ramp, 65535.0)
    low = rng.random((nints, ngroups, ny, nx)) < 0.002
    ramp[low] = rng.choice([0.0, -3.0, 5.0], low.sum())
    return np.round(ramp).astype(np.float32)


def ref_dq(rng, shape, flags, fraction=0.03):
    dq = np.zeros(shape, dtype=np.uint32)
    for flag in flags:
        dq[rng.random(shape) < fraction] |= np.uint32(flag)
    return dq


def ramp_model(data, groupdq=None, pixeldq=None, nframes=1, groupgap=0, intstart=None):
    from stdatamodels.jwst import datamodels

    nints, ngroups, ny, nx = data.shape
    model = datamodels.RampModel(
        data=data.copy(),
        groupdq=np.zeros(data.shape, np.uint8) if groupdq is None else groupdq.copy(),
        pixeldq=np.zeros((ny, nx), np.uint32) if pixeldq is None else pixeldq.copy(),
    )
    model.meta.instrument.name = "MIRI"
    model.meta.instrument.detector = "MIRIMAGE"
    model.meta.exposure.type = "MIR_IMAGE"
    model.meta.exposure.nints = nints
    model.meta.exposure.ngroups = ngroups
    model.meta.exposure.nframes = nframes
    model.meta.exposure.groupgap = groupgap
    model.meta.exposure.zero_frame = False
    if intstart is not None:
        model.meta.exposure.integration_start = intstart
        model.meta.exposure.integration_end = intstart + nints - 1
    _full_subarray(model, ny, nx)
    return model


def _full_subarray(model, ny, nx):
    model.meta.subarray.name = "FULL"
    model.meta.subarray.xstart = 1
    model.meta.subarray.ystart = 1
    model.meta.subarray.xsize = nx
    model.meta.subarray.ysize = ny


def ref_model(cls, ny=NY, nx=NX, **arrays):
    model = cls(**arrays)
    model.meta.instrument.name = "MIRI"
    _full_subarray(model, ny, nx)
    return model


def dq_pair(rng, nints=2, ngroups=10):
    groupdq = np.zeros((nints, ngroups, NY, NX), np.uint8)
    groupdq[rng.random(groupdq.shape) < 0.01] |= np.uint8(4)  # some JUMP_DET already there
    pixeldq = ref_dq(rng, (NY, NX), [HOT, REFERENCE_PIXEL], 0.02)
    return groupdq, pixeldq


# ---------------------------------------------------------------- dq_init
def test_dq_init_by_hand():
    groupdq = np.zeros((2, 3, 2, 2), np.uint8)
    groupdq[1, 2, 0, 0] = SATURATED
    pixeldq = np.array([[HOT, 0], [0, 0]], np.uint32)
    mask = np.array([[DO_NOT_USE | REFERENCE_PIXEL, HOT], [0, DO_NOT_USE]], np.uint32)
    apply_mask(groupdq, pixeldq, mask)
    assert pixeldq.tolist() == [[HOT | DO_NOT_USE | REFERENCE_PIXEL, HOT], [0, DO_NOT_USE]]
    assert (groupdq[:, :, 0, 0] & DO_NOT_USE).all() and (groupdq[:, :, 1, 1] == 1).all()
    assert groupdq[1, 2, 0, 0] == SATURATED | DO_NOT_USE
    assert (groupdq[:, :, 0, 1] == 0).all() and (groupdq[:, :, 1, 0] == 0).all()


@pytest.mark.parity
def test_dq_init_parity():
    from stdatamodels.jwst import datamodels
    from jwst.dq_init.dq_initialization import do_dqinit

    rng = np.random.default_rng(11)
    data = miri_ramp(rng)
    groupdq, pixeldq = dq_pair(rng)
    mask = ref_dq(rng, (NY, NX), [DO_NOT_USE, HOT, REFERENCE_PIXEL, UNRELIABLE_DARK])
    oracle = do_dqinit(ramp_model(data, groupdq, pixeldq),
                       ref_model(datamodels.MaskModel, dq=mask.copy()))
    apply_mask(groupdq, pixeldq, mask)
    np.testing.assert_array_equal(groupdq, oracle.groupdq)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)


# ---------------------------------------------------------------- saturation
def test_grow_mask_matches_scipy():
    from scipy.ndimage import binary_dilation

    rng = np.random.default_rng(3)
    mask = rng.random((17, 23)) < 0.05
    mask[0, 0] = mask[-1, 5] = mask[8, -1] = True
    for n in (1, 2):
        box = np.ones((2 * n + 1, 2 * n + 1), bool)
        np.testing.assert_array_equal(grow_mask(mask, n), binary_dilation(mask, box))


def test_saturation_by_hand():
    # one integration, 4 groups, 4x5 frame; pixel (1,1) reaches 100 in group 2
    data = np.full((1, 4, 4, 5), 50.0, np.float32)
    data[0, 2:, 1, 1] = 100.0
    data[0, 3, 1, 1] = 90.0            # drops back: still flagged (sticky)
    data[0, 1, 3, 4] = 0.0             # A/D floor: this group only
    threshold = np.full((4, 5), 100.0, np.float32)
    threshold[0, 4] = np.nan           # -> never saturates, NO_SAT_CHECK
    data[0, :, 0, 4] = 65535.0
    threshold_dq = np.zeros((4, 5), np.uint32)
    threshold_dq[3, 0] = NO_SAT_CHECK
    data[0, :, 3, 0] = 200.0           # above threshold but unchecked
    groupdq = np.zeros(data.shape, np.uint8)
    pixeldq = np.zeros((4, 5), np.uint32)
    flag_saturation(data, groupdq, pixeldq, threshold, threshold_dq)

    sat = (groupdq & SATURATED) != 0
    assert not sat[0, :2].any()
    box = np.zeros((4, 5), bool)
    box[0:3, 0:3] = True
    np.testing.assert_array_equal(sat[0, 2], box)
    np.testing.assert_array_equal(sat[0, 3], box)
    assert groupdq[0, 1, 3, 4] == AD_FLOOR | DO_NOT_USE
    assert groupdq[0, 0, 3, 4] == 0 and groupdq[0, 2, 3, 4] == 0
    assert pixeldq[0, 4] == NO_SAT_CHECK and pixeldq[3, 0] == NO_SAT_CHECK
    assert pixeldq.sum() == 2 * NO_SAT_CHECK
    assert np.isnan(threshold[0, 4])   # reference left as given


def test_saturation_dilution_by_hand():
    # NFRAMES=2: group 1 averages frames 3,4, so a pixel saturating in frame 4 shows only
    # 0.875 of the threshold there; it and its 3x3 box get DO_NOT_USE in group 1
    data = np.zeros((1, 3, 3, 3), np.float32) + 20.0
    data[0, :, 1, 1] = [30.0, 90.0, 100.0]
    groupdq = np.zeros(data.shape, np.uint8)
    pixeldq = np.zeros((3, 3), np.uint32)
    threshold = np.full((3, 3), 100.0, np.float32)
    flag_saturation(data, groupdq, pixeldq, threshold, np.zeros((3, 3), np.uint32), nframes=2)
    assert (groupdq[0, 0] == 0).all()
    assert (groupdq[0, 1] == DO_NOT_USE).all()
    assert (groupdq[0, 2] == SATURATED).all()
    groupdq[...] = 0
    flag_saturation(data, groupdq, pixeldq, threshold, np.zeros((3, 3), np.uint32), nframes=1)
    assert (groupdq[0, 1] == 0).all()


def _saturation_inputs(rng, nints=2, ngroups=10):
    data = miri_ramp(rng, nints, ngroups)
    threshold = rng.normal(58000, 1500, (NY, NX)).astype(np.float32)
    threshold[rng.random((NY, NX)) < 0.01] = np.nan
    threshold_dq = ref_dq(rng, (NY, NX), [NO_SAT_CHECK, DO_NOT_USE, HOT], 0.01)
    groupdq, pixeldq = dq_pair(rng, nints, ngroups)
    groupdq[0, 4, 5, 5] |= np.uint8(SATURATED)   # a pre-existing flag gets grown too
    data[0, 3, 9, 9] = np.nan
    threshold[20, 30], threshold_dq[20, 30] = 50000.5, 0
    data[-1, 2:, 20, 30] = threshold[20, 30]       # exactly at threshold: saturated
    return data, threshold, threshold_dq, groupdq, pixeldq


@pytest.mark.parity
@pytest.mark.parametrize("nframes", [1, 4])
def test_saturation_parity(nframes):
    from stdatamodels.jwst import datamodels
    from jwst.saturation.saturation import flag_saturation as jwst_flag_saturation

    rng = np.random.default_rng(21 + nframes)
    data, threshold, threshold_dq, groupdq, pixeldq = _saturation_inputs(rng)
    if nframes > 1:
        # push pixels just under threshold before a saturating group, so the dilution
        # pass (group averages diluted by unsaturated frames) has work to do
        edge = rng.random((NY, NX)) < 0.05
        data[:, 5][:, edge] = 0.9 * threshold[edge]
        data[:, 6:][:, :, edge] = 65535.0
    model = ramp_model(data, groupdq, pixeldq, nframes=nframes)
    sat_ref = ref_model(datamodels.SaturationModel, data=threshold.copy(), dq=threshold_dq.copy())
    oracle = jwst_flag_saturation(model, sat_ref, 1, True)
    assert (oracle.groupdq & SATURATED).any() and (oracle.groupdq & AD_FLOOR).any()
    for integ in range(data.shape[0]):
        sl = slice(integ, integ + 1)
        flag_saturation(data[sl], groupdq[sl], pixeldq, threshold, threshold_dq, nframes=nframes)
    assert groupdq[1, 2, 20, 30] & SATURATED and not groupdq[1, 1, 20, 30] & SATURATED
    np.testing.assert_array_equal(groupdq, oracle.groupdq)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)
    if nframes > 1:
        diluted = (groupdq[:, 5] & DO_NOT_USE) != 0
        assert diluted.sum() > 50


@pytest.mark.parity
def test_saturation_group2_test_parity():
    """stcal's group-2 test and n_pix_grow_sat=2 / use_readpatt=False variants."""
    from stcal.saturation.saturation import flag_saturated_pixels
    from stdatamodels.jwst.datamodels import dqflags

    rng = np.random.default_rng(5)
    for nframes, grow, readpatt in [(4, 2, True), (1, 0, False), (8, 1, True)]:
        data, threshold, threshold_dq, groupdq, pixeldq = _saturation_inputs(rng, 1, 6)
        jumpers = rng.random((NY, NX)) < 0.05
        data[0, 0][jumpers] = 1000.0
        # a big step into group 1, below what the dilution pass would catch
        data[0, 1][jumpers] = 0.7 * threshold[jumpers]
        data[0, 2:][:, jumpers] = 65535.0
        bias = rng.normal(300, 20, (NY, NX)).astype(np.float32)
        pattern = None
        if readpatt:
            pattern = [[g * nframes + k + 1 for k in range(nframes)] for g in range(6)]
        o_gdq, o_pdq, _ = flag_saturated_pixels(
            data.copy(), groupdq.copy(), pixeldq.copy(), threshold.copy(), threshold_dq.copy(),
            65535.0, dqflags.pixel, n_pix_grow_sat=grow, read_pattern=pattern, bias=bias)
        flag_saturation(data, groupdq, pixeldq, threshold, threshold_dq, n_pix_grow_sat=grow,
                        nframes=nframes, use_read_pattern=readpatt, bias=bias)
        np.testing.assert_array_equal(groupdq, o_gdq)
        np.testing.assert_array_equal(pixeldq, o_pdq)
        if readpatt:
            assert ((groupdq[0, 1] & DO_NOT_USE) != 0)[jumpers].mean() > 0.5


def test_saturation_and_linearity_take_band_views_and_strided_arrays():
    """The compiled kernels read group planes through their strides: a row band of a
    bigger buffer (what the engine passes) and an array with non-contiguous planes (copied
    and written back) give the same flags and values as contiguous arrays."""
    rng = np.random.default_rng(11)
    data, threshold, threshold_dq, groupdq, pixeldq = _saturation_inputs(rng, 2, 8)
    coeffs = np.stack([np.zeros((NY, NX)), np.ones((NY, NX)),
                       rng.normal(2e-6, 2e-7, (NY, NX)), rng.normal(1e-11, 1e-12, (NY, NX))]
                      ).astype(np.float32)
    usable, _ = prepare_linearity_reference(coeffs, None)

    def run(d, g, p, rows):
        flag_saturation(d, g, p, threshold[rows], threshold_dq[rows], bias=250.0)
        correct_linearity(d, g, np.zeros_like(p), usable[:, rows], None,
                          prepared=(usable[:, rows], np.zeros_like(p)))

    plain = [a.copy() for a in (data, groupdq, pixeldq)]
    run(*plain, slice(None))
    assert (plain[1] & SATURATED).any() and not np.array_equal(plain[0], data)

    rows = slice(10, 40)  # a band: a view into the whole buffers
    band = [a.copy() for a in (data, groupdq, pixeldq)]
    run(band[0][:, :, rows], band[1][:, :, rows], band[2][rows], rows)
    inner = slice(11, 39)  # the band's edge rows lack their outside neighbours
    for a, b in zip(plain, band):
        np.testing.assert_array_equal(a[..., inner, :], b[..., inner, :])

    # columns-major storage: no group plane is contiguous
    strided = [np.asfortranarray(a) for a in (data, groupdq)] + [pixeldq.copy()]
    run(*strided, slice(None))
    for a, b in zip(plain, strided):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- firstframe / lastframe
def test_firstframe_lastframe_by_hand():
    groupdq = np.zeros((2, 4, 2, 3), np.uint8)
    pixeldq = np.zeros((2, 3), np.uint32)
    groupdq[1, 2:, 0, 1] = SATURATED
    assert flag_first_group(groupdq, pixeldq)
    expected_first = np.full((2, 2, 3), DO_NOT_USE, np.uint8)
    expected_first[1, 0, 1] = 0
    np.testing.assert_array_equal(groupdq[:, 0], expected_first)
    assert pixeldq.tolist() == [[0, FLUX_ESTIMATED, 0], [0, 0, 0]]
    assert flag_last_group(groupdq)
    assert (groupdq[:, 3] & DO_NOT_USE).all()
    assert (groupdq[:, 1] == 0).all()

    few = np.zeros((1, 3, 2, 2), np.uint8)
    assert not flag_first_group(few, np.zeros((2, 2), np.uint32)) and not few.any()
    two = np.zeros((1, 2, 2, 2), np.uint8)
    assert not flag_last_group(two) and not two.any()
    assert flag_last_group(few) and (few[:, 2] == DO_NOT_USE).all()
    plain = np.zeros((1, 4, 1, 1), np.uint8)
    plain[0, 2] = SATURATED
    assert flag_first_group(plain, np.zeros((1, 1), np.uint32), bright_use_group1=False)
    assert plain[0, 0, 0, 0] == DO_NOT_USE


@pytest.mark.parity
@pytest.mark.parametrize("ngroups", [3, 4, 10])
def test_firstframe_lastframe_parity(ngroups):
    from jwst.firstframe.firstframe_sub import do_correction as jwst_firstframe
    from jwst.lastframe.lastframe_sub import do_correction as jwst_lastframe

    rng = np.random.default_rng(31 + ngroups)
    groupdq, pixeldq = dq_pair(rng, 2, ngroups)
    groupdq[:, 2:][rng.random((2, ngroups - 2, NY, NX)) < 0.1] |= np.uint8(SATURATED)
    model = ramp_model(np.zeros(groupdq.shape, np.float32), groupdq, pixeldq)
    oracle = jwst_lastframe(jwst_firstframe(model, bright_use_group1=True))
    for integ in range(2):
        flag_first_group(groupdq[integ:integ + 1], pixeldq, bright_use_group1=True)
        flag_last_group(groupdq[integ:integ + 1])
    np.testing.assert_array_equal(groupdq, oracle.groupdq)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)


# ---------------------------------------------------------------- reset
def test_reset_by_hand():
    data = np.full((1, 4, 1, 3), 100.0, np.float32)
    reset = np.array([[[[1.0, np.nan, 3.0]], [[2.0, 2.0, 2.0]]]], np.float32)  # 2 groups
    pixeldq = np.zeros((1, 3), np.uint32)
    subtract_reset(data, pixeldq, reset, np.array([[0, HOT, 0]], np.uint32))
    assert data[0, :, 0].tolist() == [[99, 100, 97], [98, 98, 98], [100] * 3, [100] * 3]
    assert pixeldq.tolist() == [[0, HOT, 0]]
    assert [reset_int_for(i, 3) for i in (0, 1, 2, 5, 57)] == [0, 1, 2, 2, 2]


@pytest.mark.parity
@pytest.mark.parametrize("intstart,reset_groups", [(None, 8), (2, 12)])
def test_reset_parity(intstart, reset_groups):
    """Fewer/more reference groups than science groups; a segmented file (INTSTART=2)."""
    from stdatamodels.jwst import datamodels
    from jwst.reset.reset_sub import do_correction as jwst_reset

    rng = np.random.default_rng(41)
    data = miri_ramp(rng, 2, 10)
    groupdq, pixeldq = dq_pair(rng)
    reset_nints = 2
    reset = rng.normal(0, 30, (reset_nints, reset_groups, NY, NX)).astype(np.float32)
    reset[rng.random(reset.shape) < 0.01] = np.nan
    reset_dq = ref_dq(rng, (NY, NX), [DO_NOT_USE, HOT])
    model = ramp_model(data, groupdq, pixeldq, intstart=intstart)
    rmodel = ref_model(datamodels.ResetModel, data=reset.copy(), dq=reset_dq.copy())
    rmodel.meta.exposure.nints = reset_nints
    rmodel.meta.exposure.ngroups = reset_groups
    oracle = jwst_reset(model, rmodel)

    first = 0 if intstart is None else intstart - 1
    for local in range(data.shape[0]):
        ref_int = reset_int_for(first + local, reset_nints)
        subtract_reset(data[local:local + 1], pixeldq, reset[ref_int:ref_int + 1], reset_dq)
    np.testing.assert_array_equal(data, oracle.data)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)


# ---------------------------------------------------------------- linearity
def test_linearity_by_hand():
    data = np.array([[[[100.0, 100.0, 100.0, 100.0, 7.0]], [[200.0] * 4 + [8.0]]]], np.float32)
    groupdq = np.zeros(data.shape, np.uint8)
    groupdq[0, 1, 0, 0] = SATURATED
    coeffs = np.zeros((3, 1, 5), np.float32)
    coeffs[:, 0, 0] = [1.0, 2.0, 0.5]      # 1 + 2x + x^2/2
    coeffs[:, 0, 1] = [1.0, np.nan, 0.5]   # NaN -> identity + NO_LIN_CORR
    coeffs[:, 0, 2] = [1.0, 0.0, 0.5]      # zero linear term -> identity + NO_LIN_CORR
    coeffs[:, 0, 3] = [1.0, 2.0, 0.5]      # ref NO_LIN_CORR -> identity
    coeffs[:, 0, 4] = [0.0, 1.0, 0.0]
    lin_dq = np.array([[0, 0, 0, NO_LIN_CORR, NONLINEAR]], np.uint32)
    pixeldq = np.zeros((1, 5), np.uint32)
    correct_linearity(data, groupdq, pixeldq, coeffs, lin_dq)
    assert data[0, 0, 0].tolist() == [1 + 200 + 5000, 100, 100, 100, 7]
    assert data[0, 1, 0].tolist() == [200, 200, 200, 200, 8]  # (0,0) saturated: raw
    assert pixeldq.tolist() == [[0, NO_LIN_CORR, NO_LIN_CORR, NO_LIN_CORR, NONLINEAR]]
    assert np.isnan(coeffs[1, 0, 1]) and coeffs[1, 0, 2] == 0  # reference left as given


@pytest.mark.parity
def test_linearity_parity():
    from stdatamodels.jwst import datamodels
    from jwst.linearity.linearity import do_correction as jwst_linearity

    rng = np.random.default_rng(51)
    data = miri_ramp(rng)
    data[0, 3, 7, 7] = np.nan
    groupdq, pixeldq = dq_pair(rng)
    groupdq[:, 6:][rng.random((2, 4, NY, NX)) < 0.1] |= np.uint8(SATURATED)
    groupdq[:, 2][rng.random((2, NY, NX)) < 0.05] |= np.uint8(DO_NOT_USE)
    ncoeffs = 5
    coeffs = np.zeros((ncoeffs, NY, NX), np.float32)
    coeffs[0] = rng.normal(0, 5, (NY, NX))
    coeffs[1] = rng.normal(1.0, 0.01, (NY, NX))
    coeffs[2] = rng.normal(2e-6, 2e-7, (NY, NX))
    coeffs[3] = rng.normal(-1e-11, 1e-12, (NY, NX))
    coeffs[4] = rng.normal(1e-16, 1e-17, (NY, NX))
    coeffs[rng.integers(0, ncoeffs, 40), rng.integers(0, NY, 40), rng.integers(0, NX, 40)] = np.nan
    coeffs[1][rng.random((NY, NX)) < 0.01] = 0.0
    lin_dq = ref_dq(rng, (NY, NX), [NO_LIN_CORR, NONLINEAR, DO_NOT_USE], 0.02)

    model = ramp_model(data, groupdq, pixeldq)
    lmodel = ref_model(datamodels.LinearityModel, coeffs=coeffs.copy(), dq=lin_dq.copy())
    oracle = jwst_linearity(model, lmodel)
    for integ in range(2):
        sl = slice(integ, integ + 1)
        correct_linearity(data[sl], groupdq[sl], pixeldq, coeffs, lin_dq)
    np.testing.assert_array_equal(data, oracle.data)   # bit-identical (NaN in same places)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)
    # the prepared form gives the same answer when reused
    again = miri_ramp(np.random.default_rng(51))
    again[0, 3, 7, 7] = np.nan
    pdq2 = np.zeros((NY, NX), np.uint32)
    correct_linearity(again, groupdq, pdq2, None, None,
                      prepared=prepare_linearity_reference(coeffs, lin_dq))
    np.testing.assert_array_equal(again, oracle.data)


# ---------------------------------------------------------------- dark_current
def test_dark_by_hand():
    data = np.full((1, 3, 1, 2), 50.0, np.float32)
    dark = np.array([[[[1.0, np.nan]], [[2.0, 2.0]], [[3.0, 3.0]], [[9.0, 9.0]]]], np.float32)
    pixeldq = np.zeros((1, 2), np.uint32)
    dark_dq = np.zeros((2, 4, 1, 2), np.uint32)
    dark_dq[1, 0, 0, 1] = UNRELIABLE_DARK
    dark_dq[0, 2, 0, 0] = HOT                   # not group 0: ignored
    assert subtract_dark(data, pixeldq, dark, combined_dark_dq(dark_dq))
    assert data[0, :, 0].tolist() == [[49, 50], [48, 48], [47, 47]]
    assert pixeldq.tolist() == [[0, UNRELIABLE_DARK]]
    # too short a dark: extended along the line through its last two groups
    data = np.full((1, 5, 1, 2), 50.0, np.float32)
    subtract_dark(data, np.zeros((1, 2), np.uint32), dark[:, :3], None)
    assert data[0, :, 0, 0].tolist() == [49, 48, 47, 46, 45]
    # dark NFRAMES larger than the science's: skipped
    assert not subtract_dark(data, pixeldq, dark, None, dark_nframes=2)
    # which dark integration
    assert [dark_int_for(i, 2) for i in (0, 1, 2, 9)] == [0, 1, 1, 1]
    assert dark_int_for(0, 4, intstart=3) == 3            # segment: always the last
    assert dark_int_for(2, 4, intstart=3, file_nints=2, frames_averaged=True) is None
    avg = average_dark_current((2, 2), ref_scalar=0.5)
    assert avg.dtype == np.float32 and (avg == 0.5).all()
    assert (average_dark_current((2, 2), user_value=2.0, ref_scalar=0.5) == 2).all()
    ref2d = np.full((2, 2), 0.3, np.float32)
    assert (average_dark_current((2, 2), ref_array=ref2d) == 0).all()
    assert (average_dark_current((2, 2), ref_array=ref2d, input_array=np.zeros((2, 2))) == 0.3).all()


def _oracle_dark(data, groupdq, pixeldq, dark, dark_dq, *, nframes=1, groupgap=0, intstart=None,
                 dark_nframes=1):
    from stcal.dark_current.dark_sub import do_correction
    from stdatamodels.jwst import datamodels

    model = ramp_model(data, groupdq, pixeldq, nframes=nframes, groupgap=groupgap,
                       intstart=intstart)
    dmodel = ref_model(datamodels.DarkMIRIModel, data=dark.copy(), dq=dark_dq.copy())
    dmodel.meta.exposure.nframes = dark_nframes
    dmodel.meta.exposure.groupgap = 0
    dmodel.meta.exposure.ngroups = dark.shape[1]
    out, _ = do_correction(model, dmodel)
    return out


@pytest.mark.parity
@pytest.mark.parametrize(
    "case",
    [
        dict(nints=2, dark_nints=2, dark_groups=12),                 # plain
        dict(nints=3, dark_nints=2, dark_groups=10),                 # later ints: last dark int
        dict(nints=2, dark_nints=3, dark_groups=7),                  # extrapolated dark
        dict(nints=2, dark_nints=3, dark_groups=12, intstart=4),     # segment: last dark int
        dict(nints=2, dark_nints=2, dark_groups=45, nframes=4),      # frame averaging
        dict(nints=2, dark_nints=2, dark_groups=30, nframes=1, groupgap=2),
        dict(nints=1, dark_nints=2, dark_groups=12, nframes=4, intstart=2),  # zero-dark quirk
    ],
)
def test_dark_parity(case):
    rng = np.random.default_rng(61)
    nints, ngroups = case["nints"], 10
    nframes, groupgap = case.get("nframes", 1), case.get("groupgap", 0)
    intstart = case.get("intstart")
    data = miri_ramp(rng, nints, ngroups)
    groupdq, pixeldq = dq_pair(rng, nints, ngroups)
    groupdq[:, 5:][rng.random((nints, ngroups - 5, NY, NX)) < 0.1] |= np.uint8(SATURATED)
    dark_nints, dark_groups = case["dark_nints"], case["dark_groups"]
    dark = np.cumsum(rng.normal(3, 2, (dark_nints, dark_groups, NY, NX)), axis=1).astype(np.float32)
    dark[rng.random(dark.shape) < 0.01] = np.nan
    dark_dq = ref_dq(rng, dark.shape, [UNRELIABLE_DARK, HOT, DO_NOT_USE], 0.01)
    oracle = _oracle_dark(data, groupdq, pixeldq, dark, dark_dq, nframes=nframes,
                          groupgap=groupgap, intstart=intstart)
    assert oracle.cal_step == "COMPLETE"

    averaged = (nframes, groupgap) != (1, 0)
    dq_contribution = combined_dark_dq(dark_dq)
    first = 0 if intstart is None else intstart - 1
    for local in range(nints):
        which = dark_int_for(first + local, dark_nints, intstart=intstart or 1,
                             file_nints=nints, frames_averaged=averaged)
        assert subtract_dark(data[local:local + 1], pixeldq,
                             None if which is None else dark[which:which + 1], dq_contribution,
                             nframes=nframes, groupgap=groupgap, dark_ngroups=dark_groups)
    np.testing.assert_array_equal(data, oracle.data)
    np.testing.assert_array_equal(pixeldq, oracle.pixeldq)


@pytest.mark.parity
def test_average_dark_current_parity():
    from stdatamodels.jwst import datamodels
    from jwst.dark_current.dark_current_step import DarkCurrentStep

    step = DarkCurrentStep()
    frame = np.full((NY, NX), 0.25, np.float32)
    frame[0, 0] = 1.5
    cases = [
        dict(user=None, ref_array=None, scalar=None, input_array=None),
        dict(user=None, ref_array=None, scalar=0.7, input_array=None),
        dict(user=0.1, ref_array=frame, scalar=0.7, input_array=None),
        dict(user=None, ref_array=frame, scalar=0.7, input_array=None),
        dict(user=None, ref_array=frame, scalar=0.7, input_array=np.zeros((NY, NX), np.float32)),
        dict(user=None, ref_array=np.zeros((NY, NX), np.float32), scalar=0.3, input_array=None),
    ]
    for case in cases:
        model = ramp_model(np.zeros((1, 3, NY, NX), np.float32))
        if case["input_array"] is not None:
            model.average_dark_current = case["input_array"].copy()
        dmodel = datamodels.DarkMIRIModel(data=np.zeros((1, 3, NY, NX), np.float32))
        if case["ref_array"] is not None:
            dmodel.average_dark_current = case["ref_array"].copy()
        dmodel.meta.exposure.average_dark_current = case["scalar"]
        step.average_dark_current = case["user"]
        step.set_average_dark_current(model, dmodel)
        expected = model.average_dark_current
        if expected is None:   # what ramp_fit then uses
            expected = np.zeros((NY, NX), np.float32)
        ours = average_dark_current((NY, NX), user_value=case["user"], ref_array=case["ref_array"],
                                    ref_scalar=case["scalar"], input_array=case["input_array"])
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, expected)

"""Tests of the OLS ramp-fitting kernel: hand-made ramps with known answers, band and
chunk invariance, and parity with stcal's OLS_C ``ramp_fit`` called the way jwst 3.0's
RampFitStep calls it (measured: identical DQ and NaNs; values equal in all but a handful
of pixels, max 1e-7 relative except near-zero slopes, max ~5e-6 relative / 6e-8 DN/s
absolute there: the KERNEL tolerance of streamdet/testing.py)."""

from __future__ import annotations

import numpy as np
import pytest

from streamdet.core.dqflags import (
    AD_FLOOR,
    DO_NOT_USE,
    JUMP_DET,
    NO_GAIN_VALUE,
    PIXEL,
    SATURATED,
)
from streamdet.algorithms.ramp_fit import (
    GroupDiscard,
    RateArrays,
    UnusableExposureError,
    fit_ramps,
    plan_from_survey,
    plan_group_discard,
    survey_dnu_groups,
    survey_group_flags,
)

from .oracle import assert_parity as oracle_parity

FRAME_TIME = 2.77504
PRODUCTS = ("sci", "err", "dq", "var_poisson", "var_rnoise")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def fit_exposure(data, groupdq, pixeldq, **kwargs):
    """Survey the discard over the whole exposure, as the engine does, then fit."""
    dnu = np.logical_and.reduce([survey_dnu_groups(groupdq[i]) for i in range(data.shape[0])])
    discard = plan_group_discard(dnu)
    return fit_ramps(data, groupdq, pixeldq, discard=discard, **kwargs)


def stcal_ramp_fit(data, groupdq, pixeldq, *, readnoise, gain, frame_time, group_time,
                   nframes=1, groupgap=0, dropframes1=0, average_dark_current=None,
                   suppress_one_group=True):
    """stcal OLS_C on a RampModel set up as RampFitStep.process leaves it."""
    from stcal.ramp_fitting import ramp_fit as stcal_ramp
    from stdatamodels.jwst.datamodels import RampModel, dqflags

    model = RampModel(data=data.copy(), groupdq=groupdq.copy(), pixeldq=pixeldq.copy())
    model.meta.instrument.name = "MIRI"
    model.meta.exposure.type = "MIR_IMAGE"
    model.meta.exposure.frame_time = frame_time
    model.meta.exposure.group_time = group_time
    model.meta.exposure.groupgap = groupgap
    model.meta.exposure.nframes = nframes
    model.meta.exposure.ngroups = data.shape[1]
    model.meta.exposure.drop_frames1 = dropframes1
    if average_dark_current is not None:
        model.average_dark_current = average_dark_current.copy()
    image, cube, _ = stcal_ramp.ramp_fit(
        model, False, readnoise.copy(), gain.copy(), "OLS_C", "optimal", "1",
        dqflags.pixel, suppress_one_group=suppress_one_group)
    if image is None:
        return None

    def pack(info):
        return RateArrays(info["slope"], info["err"], info["dq"], info["var_poisson"],
                          info["var_rnoise"])

    return pack(image), pack(cube)


def assert_parity(ours, theirs):
    """Both (rate, rateints) tuples agree within the kernel tolerance (tests/oracle.py)."""
    def named(pair):
        return {f"{label}.{name}": np.asarray(getattr(arrays, name))
                for label, arrays in zip(("rate", "rateints"), pair) for name in PRODUCTS}

    return oracle_parity(named(ours), named(theirs))


def miri_exposure(seed, nints, ngroups, nrows, ncols, *, lead_dnu=1, rscd_groups=1,
                  last_dnu=True, dark=True):
    """Realistic MIRI-like ramps with the flags the upstream steps leave."""
    rng = np.random.default_rng(seed)
    shape2 = (nrows, ncols)
    gain = rng.uniform(3.0, 6.0, shape2).astype(np.float32)
    readnoise = rng.uniform(6.0, 30.0, shape2).astype(np.float32)
    rate = (10 ** rng.uniform(np.log10(0.01), np.log10(2000.0), shape2)).astype(np.float64)
    # a few bright sources that saturate part-way up the ramp
    bright = rng.random(shape2) < 0.1
    rate[bright] = rng.uniform(2000.0, 20000.0, np.count_nonzero(bright))
    rate[5, 3] = 0.01  # faint, and given a negative dark current below
    pedestal = 12000.0 + rng.normal(0, 300, shape2)
    sat_level = rng.uniform(50000, 62000, shape2)

    groups = np.arange(1, ngroups + 1)[:, None, None]
    data = np.empty((nints, ngroups, nrows, ncols), np.float32)
    gdq = np.zeros(data.shape, np.uint8)
    for i in range(nints):
        electrons = rng.poisson(np.broadcast_to(rate * gain, (ngroups,) + shape2))
        signal = np.cumsum(electrons, axis=0) / gain
        noise = rng.normal(0, 1, (ngroups,) + shape2) * readnoise / np.sqrt(2.0)
        ramp = pedestal + signal + noise
        # cosmic rays: a step from a random group on, flagged by jump
        hit = rng.random(shape2) < (0.08 if ngroups > 1 else 0.0)
        where = rng.integers(1, max(ngroups, 2), shape2)
        size = rng.uniform(200, 5000, shape2)
        step = hit[None] & (groups - 1 >= where[None])
        ramp = ramp + step * size
        jump_flag = hit[None] & (groups - 1 == where[None])
        gdq[i][jump_flag] |= JUMP_DET
        # a second jump on some of them
        hit2 = hit & (rng.random(shape2) < 0.3)
        where2 = rng.integers(1, max(ngroups, 2), shape2)
        gdq[i][hit2[None] & (groups - 1 == where2[None])] |= JUMP_DET
        sat = ramp >= sat_level
        sat = np.maximum.accumulate(sat, axis=0)
        ramp = np.where(sat, sat_level, ramp)
        gdq[i][sat] |= SATURATED
        data[i] = ramp.astype(np.float32)

    # firstframe-like leading groups, rscd-like groups with a bright-pixel back-off
    gdq[:, :lead_dnu] |= DO_NOT_USE
    if rscd_groups:
        back_off = (gdq[:, lead_dnu + rscd_groups + 1] & SATURATED) != 0
        for k in range(lead_dnu, lead_dnu + rscd_groups):
            plane = gdq[:, k]
            plane[~back_off] |= DO_NOT_USE
    if last_dnu and ngroups > 2:
        gdq[:, -1] |= DO_NOT_USE

    # pixels saturated from the first group in integration 0 only
    gdq[0, :, 0, :3] |= SATURATED
    # pixels with just 1 or 2 usable groups (saturate right after)
    first_use = lead_dnu
    if ngroups > first_use + 3:
        gdq[:, first_use + 1:, 1, 0] |= SATURATED
        gdq[:, first_use + 2:, 1, 1] |= SATURATED
        gdq[:, first_use + 3:, 1, 2] |= SATURATED
    # an AD_FLOOR group in the middle of a ramp
    gdq[:, ngroups // 2, 2, 0] |= AD_FLOOR | DO_NOT_USE
    # consecutive jumps and a jump on the group after the leading ones
    gdq[:, lead_dnu + 1: lead_dnu + 3, 2, 1] |= JUMP_DET
    gdq[:, lead_dnu, 2, 2] |= JUMP_DET
    gdq[:, lead_dnu + rscd_groups, 2, 3] |= JUMP_DET

    if ngroups > first_use + 3:
        # a jump on the first kept group of a ramp with one clean group besides it:
        # suppressed, because suppression runs before the discard clears that jump
        gdq[:, first_use, 1, 3] |= JUMP_DET
        gdq[:, first_use + 2:, 1, 3] |= SATURATED
        # only isolated clean groups: one-group segments
        gdq[:, first_use + 1::2, 2, 4] |= DO_NOT_USE
        # every group a jump: no segment at all
        gdq[:, first_use:, 2, 5] |= JUMP_DET
        # persistence does not break segments
        gdq[:, first_use + 1, 2, 6] |= PIXEL["PERSISTENCE"]
    if ngroups > first_use + 4:
        # NaN samples inside usable stretches: at a segment end, in the middle, and in
        # a ramp reduced to two groups
        data[:, first_use, 5, 0] = np.nan
        data[:, first_use + 2, 5, 1] = np.nan
        data[:, first_use + 1, 5, 2] = np.nan
        gdq[:, first_use + 2:, 5, 2] |= SATURATED
    pixeldq = np.zeros(shape2, np.uint32)
    pixeldq[3, 0] = DO_NOT_USE | PIXEL["DEAD"]
    pixeldq[3, 1] = PIXEL["HOT"]
    pixeldq[3, 2] = PIXEL["REFERENCE_PIXEL"]
    pixeldq[3, 3] = SATURATED
    gdq[:, :, 3, 0] |= DO_NOT_USE
    gain[4, 0] = np.nan
    readnoise[4, 1] = np.nan
    gain[4, 2] = np.nan
    readnoise[4, 2] = np.nan
    gain[4, 3] = 0.0
    readnoise[4, 4] = 0.0

    kwargs = dict(readnoise=readnoise, gain=gain, frame_time=FRAME_TIME,
                  group_time=FRAME_TIME, nframes=1, groupgap=0, dropframes1=0)
    if dark:
        dark_current = rng.uniform(0.0, 0.5, shape2).astype(np.float32)
        dark_current[5, 3] = -50.0
        kwargs["average_dark_current"] = dark_current
    return data, gdq, pixeldq, kwargs


# --------------------------------------------------------------------------------------
# hand-made cases with known answers
# --------------------------------------------------------------------------------------


def tiny(values, flags=None, *, rn=10.0, gain=4.0, nints=1):
    values = np.asarray(values, np.float32)
    data = np.broadcast_to(values[None, :, None, None], (nints, values.size, 1, 1)).copy()
    gdq = np.zeros(data.shape, np.uint8)
    if flags is not None:
        gdq[:, :, 0, 0] = np.asarray(flags, np.uint8)
    kwargs = dict(readnoise=np.full((1, 1), rn, np.float32),
                  gain=np.full((1, 1), gain, np.float32),
                  frame_time=FRAME_TIME, group_time=FRAME_TIME)
    return data, gdq, np.zeros((1, 1), np.uint32), kwargs


def test_noiseless_linear_ramp_gives_its_slope():
    slope = 37.5
    data, gdq, pdq, kw = tiny(12000.0 + slope * np.arange(10))
    rate, ints = fit_ramps(data, gdq, pdq, **kw)
    assert rate.sci[0, 0] == pytest.approx(slope / FRAME_TIME, rel=1e-6)
    assert ints.sci[0, 0, 0] == pytest.approx(slope / FRAME_TIME, rel=1e-6)
    assert rate.dq[0, 0] == 0
    # read noise variance of an n-group segment: 12 rn_e^2 / (t^2 g^2 (n^3 - n))
    rn_e = 10.0 * 4.0 / np.sqrt(2.0)
    expect_vr = 12 * rn_e**2 / (FRAME_TIME**2 * 16.0 * (10**3 - 10))
    assert rate.var_rnoise[0, 0] == pytest.approx(expect_vr, rel=1e-6)
    # Poisson variance from the median rate (DN/s) over group_time * gain * (n - 1)
    expect_vp = (slope / FRAME_TIME) / (FRAME_TIME * 4.0 * 9)
    assert rate.var_poisson[0, 0] == pytest.approx(expect_vp, rel=1e-6)
    assert rate.err[0, 0] == pytest.approx(np.sqrt(expect_vp + expect_vr), rel=1e-6)


def test_jump_splits_ramp_into_two_segments_averaged_by_read_noise():
    # 5 groups at 10 DN/group, then a 1000 DN jump seen first in group 5, then 20 DN/group
    first = 12000.0 + 10.0 * np.arange(5)
    second = first[-1] + 1000.0 + 20.0 * np.arange(7)
    flags = [0] * 5 + [JUMP_DET] + [0] * 6
    data, gdq, pdq, kw = tiny(np.concatenate([first, second]), flags)
    rate, ints = fit_ramps(data, gdq, pdq, **kw)
    # segments are groups 0-4 and 5-11 (the jump group starts the second one); they are
    # weighted by 1/var_rnoise, proportional to n^3 - n: 120 and 336
    expect = (10.0 * 120 + 20.0 * 336) / (120 + 336) / FRAME_TIME
    assert ints.sci[0, 0, 0] == pytest.approx(expect, rel=1e-6)
    assert rate.sci[0, 0] == pytest.approx(expect, rel=1e-6)
    assert rate.dq[0, 0] == JUMP_DET


def test_saturated_integration_is_nan_and_flagged():
    data, gdq, pdq, kw = tiny(12000.0 + 100.0 * np.arange(6), nints=2)
    gdq[0, :, 0, 0] = SATURATED
    rate, ints = fit_ramps(data, gdq, pdq, **kw)
    assert np.isnan(ints.sci[0, 0, 0])
    assert ints.dq[0, 0, 0] == DO_NOT_USE | SATURATED
    assert ints.err[0, 0, 0] == 0 and ints.var_poisson[0, 0, 0] == 0
    assert rate.sci[0, 0] == pytest.approx(100.0 / FRAME_TIME, rel=1e-6)
    assert rate.dq[0, 0] == SATURATED


def test_one_good_group_is_suppressed():
    flags = [0] + [SATURATED] * 5
    data, gdq, pdq, kw = tiny(12000.0 + 100.0 * np.arange(6), flags)
    rate, ints = fit_ramps(data, gdq, pdq, **kw)
    assert np.isnan(rate.sci[0, 0]) and rate.err[0, 0] == 0
    assert rate.dq[0, 0] == DO_NOT_USE | SATURATED


def test_nan_gain_marks_pixel_unusable():
    data, gdq, pdq, kw = tiny(12000.0 + 100.0 * np.arange(6), gain=np.nan)
    rate, ints = fit_ramps(data, gdq, pdq, **kw)
    assert np.isnan(rate.sci[0, 0])
    assert rate.dq[0, 0] == DO_NOT_USE | NO_GAIN_VALUE
    assert rate.var_rnoise[0, 0] == 0 and rate.err[0, 0] == 0


def test_discard_plan():
    assert plan_group_discard([True, False, False, True]) == GroupDiscard(1, True)
    assert plan_group_discard([True, True, False, False]) == (2, False)
    assert plan_group_discard([False]) == (0, False)
    assert plan_group_discard([True]) == (0, False)
    with pytest.raises(UnusableExposureError):
        plan_group_discard([True, True, True])
    with pytest.raises(UnusableExposureError):
        plan_group_discard([True, False, True])
    gdq = np.zeros((2, 4, 3, 3), np.uint8)
    gdq[:, 0] = DO_NOT_USE
    gdq[1, 3] = DO_NOT_USE
    assert survey_dnu_groups(gdq).tolist() == [True, False, False, False]
    assert survey_dnu_groups(gdq[1]).tolist() == [True, False, False, True]


def test_plan_from_the_pieces_surveys():
    """The exposure's plan from its pieces' group flags ANDed together, as the step
    surveys them band by band."""
    gdq = np.zeros((2, 4, 4, 3), np.uint8)
    gdq[:, 0] = DO_NOT_USE
    gdq[:, 3] = DO_NOT_USE
    gdq[1, 3, 2:, 1] = 0  # one band has a usable last group
    pieces = [survey_group_flags(gdq[:, :, :2]), survey_group_flags(gdq[:, :, 2:])]
    assert pieces[0].tolist() == [DO_NOT_USE, 0, 0, DO_NOT_USE]
    assert pieces[1].tolist() == [DO_NOT_USE, 0, 0, 0]
    assert plan_from_survey(pieces[0]) == (1, True)
    assert plan_from_survey(pieces[0] & pieces[1]) == (1, False)
    # a later step took DO_NOT_USE off the last group somewhere
    assert plan_from_survey(pieces[0], still_dnu=[True, True, True, False]) == (1, False)
    gdq[:, 1] |= SATURATED
    with pytest.raises(UnusableExposureError, match="saturated in the first usable group"):
        plan_from_survey(survey_group_flags(gdq))
    with pytest.raises(UnusableExposureError, match="at least 2 groups"):
        plan_from_survey([DO_NOT_USE, 0, DO_NOT_USE])


def test_bands_stitch_to_whole_frame():
    data, gdq, pdq, kw = miri_exposure(7, 2, 12, 24, 16)
    dnu = survey_dnu_groups(gdq)
    discard = plan_group_discard(dnu)
    whole = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    cuts = [0, 1, 5, 13, 24]
    pieces = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        band_kw = dict(kw)
        for key in ("readnoise", "gain", "average_dark_current"):
            band_kw[key] = kw[key][a:b]
        pieces.append(fit_ramps(data[:, :, a:b], gdq[:, :, a:b], pdq[a:b], discard=discard,
                                **band_kw))
    for k, axis in ((0, 0), (1, 1)):
        for name in PRODUCTS:
            stitched = np.concatenate([getattr(p[k], name) for p in pieces], axis=axis)
            np.testing.assert_array_equal(stitched, getattr(whole[k], name))


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_chunking_and_paths_are_bit_identical(monkeypatch, chunk):
    from streamdet.algorithms import ramp_fit as module

    data, gdq, pdq, kw = miri_exposure(9, 2, 12, 20, 16)
    discard = plan_group_discard(survey_dnu_groups(gdq))
    whole = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    monkeypatch.setattr(module, "_CHUNK_PIXELS", chunk)
    chunked = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    # and every pixel through the general (per-pixel flags) path
    _all_general(monkeypatch, module)
    general = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    for other in (chunked, general):
        for k in (0, 1):
            for name in PRODUCTS:
                np.testing.assert_array_equal(getattr(other[k], name), getattr(whole[k], name))


def test_inputs_left_untouched():
    data, gdq, pdq, kw = miri_exposure(3, 2, 8, 8, 8)
    copies = [a.copy() for a in (data, gdq, pdq, kw["readnoise"], kw["gain"])]
    fit_exposure(data, gdq, pdq, **kw)
    for before, after in zip(copies, (data, gdq, pdq, kw["readnoise"], kw["gain"])):
        np.testing.assert_array_equal(before, after)


# --------------------------------------------------------------------------------------
# edge cases of the compiled loops: both paths (shared flag template / per-pixel flags)
# must agree bit for bit, on any memory layout
# --------------------------------------------------------------------------------------


def _all_general(monkeypatch, module):
    """Route every pixel through the per-pixel-flags path."""
    monkeypatch.setattr(module, "_TEMPLATE_PATH", False)


def _fit_both_paths(monkeypatch, data, gdq, pdq, **kw):
    """(results, median rates) through the template path, then the general path."""
    from streamdet.algorithms import ramp_fit as module

    medians = []
    real_median = module._median_rate

    def recording(*args):
        medians.append(real_median(*args))
        return medians[-1]

    monkeypatch.setattr(module, "_median_rate", recording)
    discard = plan_group_discard(survey_dnu_groups(gdq))
    regular = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    with monkeypatch.context() as patch:
        _all_general(patch, module)
        general = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    return (regular, general), medians


def _assert_identical(a, b):
    for k in (0, 1):
        for name in PRODUCTS:
            np.testing.assert_array_equal(getattr(a[k], name), getattr(b[k], name),
                                          err_msg=f"{('rate', 'rateints')[k]}.{name}")


def _clean_exposure(nints=2, ngroups=10, nrows=4, ncols=6, seed=21):
    """Noiseless-ish ramps whose flags are all alike (all take the template path)."""
    rng = np.random.default_rng(seed)
    slope = rng.uniform(1.0, 50.0, (nrows, ncols))
    base = rng.uniform(11000.0, 13000.0, (nrows, ncols))
    groups = np.arange(ngroups)[:, None, None]
    ramp = (base + slope * groups + rng.normal(0, 2, (ngroups, nrows, ncols)))
    data = np.broadcast_to(ramp, (nints,) + ramp.shape).astype(np.float32)
    gdq = np.zeros(data.shape, np.uint8)
    gdq[:, 0] = DO_NOT_USE
    kw = dict(readnoise=np.full((nrows, ncols), 12.0, np.float32),
              gain=np.full((nrows, ncols), 4.0, np.float32),
              frame_time=FRAME_TIME, group_time=FRAME_TIME)
    return data, gdq, np.zeros((nrows, ncols), np.uint32), kw


@pytest.mark.parity
def test_nan_samples_in_template_ramps(monkeypatch):
    data, gdq, pdq, kw = _clean_exposure()
    data[0, 3, 0, 0] = np.nan          # mid ramp, one integration
    data[:, 1, 0, 1] = np.nan          # the first fitted group
    data[:, -1, 0, 2] = np.nan         # the last group
    data[1, :, 0, 3] = np.nan          # a whole ramp
    (regular, general), medians = _fit_both_paths(monkeypatch, data, gdq, pdq, **kw)
    _assert_identical(regular, general)
    np.testing.assert_array_equal(medians[0], medians[1])
    # the median skips the NaN differences (pixel (0, 1): integrations alike)
    diffs = np.diff(data[0, 2:, 0, 1].astype(np.float64))
    gtime = np.float64(np.float32(FRAME_TIME))
    assert medians[0][1] == pytest.approx(np.median(diffs) / gtime, rel=1e-12)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    assert_parity(regular, theirs)


def test_infinite_samples_give_the_same_results_on_both_paths(monkeypatch):
    # inf - inf differences are NaN although no sample is
    data, gdq, pdq, kw = _clean_exposure()
    data[0, :, 0, 0] = np.inf
    data[:, 4:, 0, 1] = np.inf
    data[1, 5, 1, 2] = -np.inf
    (regular, general), medians = _fit_both_paths(monkeypatch, data, gdq, pdq, **kw)
    np.testing.assert_array_equal(medians[0], medians[1])
    _assert_identical(regular, general)


def test_median_differences_exact_when_not_within_factor_two(monkeypatch):
    # float32 differences of samples further apart than a factor two (or not all
    # positive) are not exact: such ramps must get double-precision differences
    data, gdq, pdq, kw = _clean_exposure(nrows=2, ncols=4)
    data[:, 1:, 0, 0] = np.float32(0.3) + np.float32(2.7) * np.arange(9, dtype=np.float32)
    data[:, 1:, 0, 1] = np.linspace(-5.3, 7.1, 9, dtype=np.float32)    # crosses zero
    data[:, 1:, 0, 2] = np.float32(-3.3) - np.arange(9, dtype=np.float32) * 1.1
    data[:, 1:, 0, 3] = np.float32(1.0e-3) * 3.3 ** np.arange(9, dtype=np.float32)
    (regular, general), medians = _fit_both_paths(monkeypatch, data, gdq, pdq, **kw)
    np.testing.assert_array_equal(medians[0], medians[1])
    _assert_identical(regular, general)
    for pix in range(4):
        samples = data[0, 1:, 0, pix].astype(np.float64)
        expect = np.median(np.diff(samples)) / np.float64(np.float32(FRAME_TIME))
        assert medians[0][pix] == expect
    # a float32 difference would have been off for the first one
    samples = data[0, 1:, 0, 0]
    assert not np.array_equal(np.diff(samples).astype(np.float64),
                              np.diff(samples.astype(np.float64)))


@pytest.mark.parametrize("ngroups", [3, 4, 5, 6, 9, 17, 18, 28, 31, 33, 40, 66])
def test_template_median_network_picks_the_middle_values(monkeypatch, ngroups):
    """The template path's medians (a sorting network over each block of pixels, of
    any width; a partial last block) are the general path's and numpy's."""
    data, gdq, pdq, kw = _clean_exposure(nints=2, ngroups=ngroups, nrows=7, ncols=11,
                                         seed=ngroups)
    rng = np.random.default_rng(ngroups)
    # steps of every size in any order, ties among them, a few large (jumps not flagged)
    steps = rng.normal(30, 10, data.shape).astype(np.float32)
    steps[:, :, ::3] = np.round(steps[:, :, ::3] / 5) * 5
    steps[rng.random(data.shape) < 0.05] += 400
    data = np.float32(10000) + np.cumsum(steps, axis=1, dtype=np.float32)
    if ngroups > 4:
        gdq[:, ngroups // 2] = JUMP_DET  # a template with a difference left out
    (regular, general), medians = _fit_both_paths(monkeypatch, data, gdq, pdq, **kw)
    np.testing.assert_array_equal(medians[0], medians[1])
    _assert_identical(regular, general)
    gtime = np.float64(np.float32(FRAME_TIME))
    # group 0 is discarded; a difference ending on the JUMP_DET group is left out
    usable = [g for g in range(1, ngroups - 1) if not gdq[0, g + 1, 0, 0] & JUMP_DET]
    diffs = (data[:, 1:] - data[:, :-1])[:, usable].astype(np.float64)
    per_int = np.median(diffs.reshape(*diffs.shape[:2], -1), axis=1) / gtime
    np.testing.assert_array_equal(medians[0], (per_int[0] + per_int[1]) / 2)


@pytest.mark.parity
@pytest.mark.parametrize("gain, rn", [(0.0, 10.0), (-2.0, 10.0), (4.0, 0.0), (4.0, -10.0),
                                      (np.nan, np.nan), (np.inf, 10.0)])
def test_odd_gain_and_read_noise(monkeypatch, gain, rn):
    data, gdq, pdq, kw = _clean_exposure(nrows=2, ncols=3)
    kw["gain"][1, 1] = gain
    kw["readnoise"][1, 1] = rn
    (regular, general), _ = _fit_both_paths(monkeypatch, data, gdq, pdq, **kw)
    _assert_identical(regular, general)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    if np.isfinite(gain):
        assert_parity(regular, theirs)
    if not gain > 0:
        no_gain = DO_NOT_USE | NO_GAIN_VALUE
        assert regular[0].dq[1, 1] & no_gain == no_gain
        assert np.isnan(regular[0].sci[1, 1])


def test_one_pixel_matches_its_place_in_a_frame():
    data, gdq, pdq, kw = miri_exposure(17, 2, 12, 8, 8)
    discard = plan_group_discard(survey_dnu_groups(gdq))
    whole = fit_ramps(data, gdq, pdq, discard=discard, **kw)
    for r, c in ((0, 0), (2, 5), (5, 0), (7, 7)):
        one_kw = dict(kw)
        for key in ("readnoise", "gain", "average_dark_current"):
            one_kw[key] = kw[key][r:r + 1, c:c + 1]
        one = fit_ramps(data[:, :, r:r + 1, c:c + 1], gdq[:, :, r:r + 1, c:c + 1],
                        pdq[r:r + 1, c:c + 1], discard=discard, **one_kw)
        for name in PRODUCTS:
            np.testing.assert_array_equal(getattr(one[0], name)[0, 0],
                                          getattr(whole[0], name)[r, c])
            np.testing.assert_array_equal(getattr(one[1], name)[:, 0, 0],
                                          getattr(whole[1], name)[:, r, c])


@pytest.mark.parametrize("layout", ["rows", "columns", "reversed", "big_endian"])
def test_views_and_layouts_give_identical_results(layout):
    data, gdq, pdq, kw = miri_exposure(19, 2, 10, 16, 12)
    discard = plan_group_discard(survey_dnu_groups(gdq))
    # inside a bigger buffer, as the engine's bands are
    big = np.zeros((2, 10, 20, 24), np.float32)
    big_dq = np.zeros(big.shape, np.uint8)
    if layout == "rows":
        view, view_dq, pick = big[:, :, 2:18, :12], big_dq[:, :, 2:18, :12], np.s_[:, :]
    elif layout == "columns":
        # every other column: the pixel axis has a stride of 2 elements
        view, view_dq, pick = big[:, :, 2:18, ::2], big_dq[:, :, 2:18, ::2], np.s_[:, :]
    elif layout == "reversed":
        view, view_dq, pick = big[:, :, 17:1:-1, 11::-1], big_dq[:, :, 17:1:-1, 11::-1], \
            np.s_[::-1, ::-1]
    else:
        view, view_dq, pick = None, None, np.s_[:, :]
    if view is None:
        view = data.astype(">f4")
        view_dq = gdq
    else:
        view[...] = data[(slice(None), slice(None)) + pick]
        view_dq[...] = gdq[(slice(None), slice(None)) + pick]
    view_kw = dict(kw)
    for key in ("readnoise", "gain", "average_dark_current"):
        view_kw[key] = kw[key][pick]
    contiguous = fit_ramps(np.ascontiguousarray(view), np.ascontiguousarray(view_dq),
                           pdq[pick].copy(), discard=discard, **view_kw)
    viewed = fit_ramps(view, view_dq, pdq[pick], discard=discard, **view_kw)
    _assert_identical(viewed, contiguous)
    if layout in ("rows", "big_endian"):
        _assert_identical(viewed, fit_ramps(data, gdq, pdq, discard=discard, **kw))


# --------------------------------------------------------------------------------------
# parity with stcal OLS_C
# --------------------------------------------------------------------------------------

PARITY_CASES = {
    # name: (seed, nints, ngroups, nrows, ncols, options)
    "2x20_discard_lead_and_last": (1, 2, 20, 48, 40, dict(lead_dnu=1, rscd_groups=3)),
    "2x20_no_discard": (2, 2, 20, 40, 40, dict(lead_dnu=0, rscd_groups=1, last_dnu=False)),
    "2x20_two_leading_discarded": (3, 2, 20, 32, 32, dict(lead_dnu=2, rscd_groups=0)),
    "3x5": (4, 3, 5, 40, 40, dict(lead_dnu=1, rscd_groups=0)),
    "1x20": (5, 1, 20, 40, 40, dict(lead_dnu=1, rscd_groups=2)),
    "2x20_no_dark": (6, 2, 20, 32, 32, dict(lead_dnu=1, rscd_groups=1, dark=False)),
    "2x4": (8, 2, 4, 32, 32, dict(lead_dnu=1, rscd_groups=0)),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_stcal(case):
    seed, nints, ngroups, nrows, ncols, options = PARITY_CASES[case]
    data, gdq, pdq, kw = miri_exposure(seed, nints, ngroups, nrows, ncols, **options)
    ours = fit_exposure(data, gdq, pdq, **kw)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    report = assert_parity(ours, theirs)
    print(case, report)


@pytest.mark.parity
def test_parity_without_suppression():
    data, gdq, pdq, kw = miri_exposure(11, 2, 10, 32, 32, lead_dnu=1, rscd_groups=0)
    ours = fit_exposure(data, gdq, pdq, suppress_one_group=False, **kw)
    theirs = stcal_ramp_fit(data, gdq, pdq, suppress_one_group=False, **kw)
    assert_parity(ours, theirs)


@pytest.mark.parity
def test_parity_single_group():
    data, gdq, pdq, kw = miri_exposure(12, 2, 1, 16, 16, lead_dnu=0, rscd_groups=0,
                                       last_dnu=False)
    ours = fit_exposure(data, gdq, pdq, **kw)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    assert_parity(ours, theirs)


@pytest.mark.parity
def test_parity_nframes_and_timing():
    data, gdq, pdq, kw = miri_exposure(13, 2, 10, 24, 24, lead_dnu=1, rscd_groups=0)
    kw.update(nframes=4, groupgap=2, dropframes1=1, frame_time=0.5, group_time=3.0)
    ours = fit_exposure(data, gdq, pdq, **kw)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    assert_parity(ours, theirs)


@pytest.mark.parity
def test_parity_chargeloss():
    data, gdq, pdq, kw = miri_exposure(14, 2, 12, 24, 24, lead_dnu=1, rscd_groups=0)
    rng = np.random.default_rng(0)
    lossy = rng.random(gdq.shape) < 0.03
    gdq[lossy] |= PIXEL["CHARGELOSS"] | DO_NOT_USE
    ours = fit_exposure(data, gdq, pdq, **kw)
    theirs = stcal_ramp_fit(data, gdq, pdq, **kw)
    assert_parity(ours, theirs)


@pytest.mark.parity
def test_parity_unusable_exposure():
    data, gdq, pdq, kw = miri_exposure(15, 1, 3, 8, 8, lead_dnu=1, rscd_groups=0)
    gdq[:, 0] |= DO_NOT_USE
    gdq[:, 2] |= DO_NOT_USE
    assert stcal_ramp_fit(data, gdq, pdq, **kw) is None
    with pytest.raises(UnusableExposureError):
        fit_exposure(data, gdq, pdq, **kw)


# --------------------------------------------------------------------------------------
# the kernels' interface (streamdet/_ckernels/ramp_fit.h, through cffi)
# --------------------------------------------------------------------------------------


def test_kernel_calls_are_checked_against_the_header():
    """A wrong element type, a missing argument or an unknown struct field is refused
    before the C code runs (through ctypes each was a wrong address or a garbage value)."""
    from streamdet._ckernels import pointer
    from streamdet._ckernels._ramp_fit import ffi, lib

    gdq = np.array([[0, 0], [JUMP_DET, 0], [0, 0]], np.uint8)
    template = np.empty(3, np.uint8)
    regular = np.empty(2, bool)
    lib.rf_layout(pointer(ffi, gdq), 3, 2, 1, pointer(ffi, template), pointer(ffi, regular))
    assert template.tolist() == [0, 0, 0] and regular.tolist() == [False, True]
    with pytest.raises(TypeError, match="uint8_t"):
        lib.rf_layout(pointer(ffi, gdq.astype(np.float32)), 3, 2, 1,
                      pointer(ffi, template), pointer(ffi, regular))
    with pytest.raises(TypeError, match="6 arguments"):
        lib.rf_layout(pointer(ffi, gdq), 3, 2, pointer(ffi, template), pointer(ffi, regular))
    with pytest.raises(KeyError):
        ffi.new("rf_segment_list *", {"count": 1, "pixels": pointer(ffi, np.zeros(1, np.int64))})


@pytest.mark.parametrize("flags, expect_dq, expect_segments", [
    # saturated from the first group: unusable, no segment
    ((SATURATED, SATURATED, SATURATED), DO_NOT_USE | SATURATED, []),
    # every group DO_NOT_USE: DO_NOT_USE only
    ((DO_NOT_USE, DO_NOT_USE, DO_NOT_USE), DO_NOT_USE, []),
    # a jump starts the second segment one group early; PERSISTENCE neither breaks a
    # segment nor is lost from the DQ
    ((0, 0, JUMP_DET, 0, PIXEL["PERSISTENCE"]), JUMP_DET | PIXEL["PERSISTENCE"],
     [(0, 2), (2, 3)]),
])
def test_segment_kernel_takes_its_dq_bits_from_dqflags(flags, expect_dq, expect_segments):
    """rf_segments tests the DQ bits the build defines from core/dqflags.py (DQ_*)."""
    from streamdet.algorithms.ramp_fit import _find_segments

    gdq = np.array(flags, np.uint8)[:, None]
    seen = np.zeros(1, np.uint8)
    dq = np.zeros(1, np.uint32)
    segments = _find_segments(gdq, np.zeros(1, np.int64), seen=seen, dq=dq,
                              fittable_only=True)
    assert int(dq[0]) == expect_dq
    assert int(seen[0]) == np.bitwise_or.reduce(gdq[:, 0])
    assert list(zip(segments.start.tolist(), segments.length.tolist())) == expect_segments

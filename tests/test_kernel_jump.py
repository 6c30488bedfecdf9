"""Tests of the jump-detection kernel, against jwst 3.0's JumpStep where marked ``parity``."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from streamdet.algorithms import jump
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, PIXEL, SATURATED

GROUP_TIME = 2.775


# ----------------------------------------------------------------------------- simulation

def simulate(seed, nints, ngroups, nrows, ncols, *, cr_fraction=0.01, full_well=60000.0,
             keep_first_group=0.02, bad_references=True, nan_fraction=1e-4):
    """MIRI-like ramps as jump sees them (DN, after rscd/lastframe/saturation flagging).

    Steps of log-uniform size 3..60000 DN (a few negative) land on random groups; bright
    pixels and big steps run into saturation (cumulative SATURATED); group 0 is DO_NOT_USE
    except for a few "backed-off" bright pixels, the last group is DO_NOT_USE everywhere;
    a few dead pixels are DO_NOT_USE throughout; some gain/readnoise values are NaN, 0 or
    negative; a few samples are NaN.
    """
    rng = np.random.default_rng(seed)
    gain = rng.normal(5.5, 0.2, (nrows, ncols)).astype(np.float32)
    readnoise = rng.normal(8.0, 1.0, (nrows, ncols)).astype(np.float32)
    rate = rng.exponential(30.0, (nrows, ncols)) + 2.0
    bright = rng.random((nrows, ncols)) < 0.02
    rate[bright] = rng.uniform(2000, 8000, bright.sum())
    pedestal = rng.normal(12000, 500, (nrows, ncols))
    data = np.empty((nints, ngroups, nrows, ncols), np.float32)
    groupdq = np.zeros(data.shape, np.uint8)
    for i in range(nints):
        electrons = rng.poisson(np.repeat((rate * gain)[None], ngroups, axis=0)) / gain
        ramp = pedestal + np.cumsum(electrons, axis=0)
        ramp += rng.normal(0, 1, (ngroups, nrows, ncols)) * (readnoise / np.sqrt(2))
        struck = rng.random((ngroups, nrows, ncols)) < cr_fraction
        struck[0] = False
        size = np.exp(rng.uniform(np.log(3), np.log(60000), struck.shape)) * struck
        size[rng.random(struck.shape) < 0.05] *= -0.2
        ramp += np.cumsum(size, axis=0)
        data[i] = ramp.astype(np.float32)
        groupdq[i][np.maximum.accumulate(ramp >= full_well, axis=0)] |= SATURATED
    backed_off = rng.random((nrows, ncols)) < keep_first_group
    groupdq[:, 0][:, ~backed_off] |= DO_NOT_USE
    groupdq[:, -1] |= DO_NOT_USE
    pixeldq = np.zeros((nrows, ncols), np.uint32)
    dead = rng.random((nrows, ncols)) < 0.003
    groupdq[:, :, dead] |= DO_NOT_USE
    pixeldq[dead] |= DO_NOT_USE
    if bad_references:
        gain[rng.random((nrows, ncols)) < 0.003] = np.nan
        readnoise[rng.random((nrows, ncols)) < 0.003] = np.nan
        gain[0, 1] = 0.0
        gain[1, 0] = -2.0
        readnoise[2, 2] = 0.0
    data[rng.random(data.shape) < nan_fraction] = np.nan
    return data, groupdq, pixeldq, gain, readnoise


def ours(data, groupdq, pixeldq, gain, readnoise, *, nframes=1, **params):
    groupdq, pixeldq = groupdq.copy(), pixeldq.copy()
    counts = jump.detect_jumps(data, groupdq, pixeldq, gain=gain, readnoise=readnoise,
                               nframes=nframes, group_time=GROUP_TIME, **params)
    return groupdq, pixeldq, counts


def jwst_jump(data, groupdq, pixeldq, gain, readnoise, *, nframes=1, **params):
    """jwst 3.0's JumpStep itself: its own JumpData set-up and PRIMECRS/EXTNCRS code.

    The gain and readnoise references are handed over as override models, so no CRDS.
    """
    JumpStep = pytest.importorskip("jwst.jump").JumpStep
    datamodels = pytest.importorskip("stdatamodels.jwst.datamodels")

    nrows, ncols = data.shape[2:]
    ramp = datamodels.RampModel(data=data.copy(), groupdq=groupdq.copy(), pixeldq=pixeldq.copy())
    ramp.meta.instrument.name = "MIRI"
    ramp.meta.instrument.detector = "MIRIMAGE"
    ramp.meta.exposure.nframes = nframes
    ramp.meta.exposure.group_time = GROUP_TIME
    ramp.meta.exposure.frame_time = GROUP_TIME
    gain_model = datamodels.GainModel(data=gain.copy())
    noise_model = datamodels.ReadnoiseModel(data=readnoise.copy())
    for model in (ramp, gain_model, noise_model):
        model.meta.subarray.xstart = 1
        model.meta.subarray.ystart = 1
        model.meta.subarray.xsize = ncols
        model.meta.subarray.ysize = nrows
    step = JumpStep(override_gain=gain_model, override_readnoise=noise_model, **params)
    logging.getLogger("stpipe").setLevel(logging.WARNING)
    logging.getLogger("jwst").setLevel(logging.WARNING)
    logging.getLogger("stcal").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = step.process(ramp)
    exposure = result.meta.exposure
    return (np.asarray(result.groupdq), np.asarray(result.pixeldq),
            exposure.primary_cosmic_rays, exposure.extended_emission_events)


def assert_same_as_jwst(exposure, nframes=1, **params):
    """Our jump flags and PRIMECRS/EXTNCRS are exactly jwst's JumpStep's (bit for bit: no
    tolerance applies to flags), and the data are left untouched."""
    data, groupdq, pixeldq, gain, readnoise = exposure
    untouched = data.copy()
    our_dq, our_pdq, counts = ours(data, groupdq, pixeldq, gain, readnoise, nframes=nframes, **params)
    their_dq, their_pdq, primecrs, extncrs = jwst_jump(data, groupdq, pixeldq, gain, readnoise,
                                                       nframes=nframes, **params)
    assert np.array_equal(data, untouched, equal_nan=True)
    n_diff = np.count_nonzero(our_dq != their_dq)
    assert n_diff == 0, f"{n_diff} groupdq values differ"
    assert np.array_equal(our_pdq, their_pdq)
    keywords = jump.cosmic_ray_keywords(counts, jump.unusable_groups(groupdq), GROUP_TIME,
                                        *data.shape[2:])
    assert keywords == (primecrs, extncrs)
    return our_dq, counts


# ----------------------------------------------------------------------------- parity

@pytest.mark.parity
def test_parity_two_ints_twenty_groups():
    """Single-pass search, CRs from sub-threshold to >1000 sigma, saturation, bad refs."""
    exposure = simulate(1, 2, 20, 96, 100, cr_fraction=0.02)
    flags, counts = assert_same_as_jwst(exposure)
    assert counts.primary_crs > 1000 and not counts.skipped
    assert np.count_nonzero(flags & JUMP_DET) > counts.primary_crs  # neighbours were flagged


@pytest.mark.parity
def test_parity_iterative_three_ints_five_groups():
    """Only 2 usable differences per integration: the iterative search."""
    assert_same_as_jwst(simulate(2, 3, 5, 64, 64, cr_fraction=0.05))


@pytest.mark.parity
def test_parity_iterative_many_jumps_one_int():
    assert_same_as_jwst(simulate(3, 1, 11, 48, 48, cr_fraction=0.1, keep_first_group=0.0))


@pytest.mark.parity
def test_parity_sigma_clip_across_integrations():
    exposure = simulate(4, 110, 6, 12, 14, cr_fraction=0.003)
    _, counts = assert_same_as_jwst(exposure)
    assert counts.all_flagged_groups is not None


@pytest.mark.parity
def test_parity_sigma_clip_group_reset():
    """A group struck in every pixel: stcal resets lone JUMP_DET flags there."""
    data, groupdq, pixeldq, gain, readnoise = simulate(5, 100, 5, 6, 8, cr_fraction=0.01,
                                                       bad_references=False, nan_fraction=0)
    data[7, 2:] += 30000.0
    _, counts = assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))
    assert counts.all_flagged_groups[7, 2]


@pytest.mark.parity
def test_parity_sigma_clip_all_differences():
    assert_same_as_jwst(simulate(6, 2, 60, 24, 24, cr_fraction=0.02), only_use_ints=False)


@pytest.mark.parity
def test_parity_after_jump_flagging():
    exposure = simulate(7, 2, 20, 64, 64, cr_fraction=0.03)
    assert_same_as_jwst(exposure, after_jump_flag_dn1=300.0, after_jump_flag_time1=10.0,
                  after_jump_flag_dn2=5000.0, after_jump_flag_time2=30.0)
    exposure = simulate(8, 3, 6, 48, 48, cr_fraction=0.05)
    assert_same_as_jwst(exposure, after_jump_flag_dn1=0.0, after_jump_flag_time1=200.0)


@pytest.mark.parity
def test_parity_ties_integer_ramps():
    """Quantised ramps give tied differences (median ties, several equal maxima)."""
    for seed, shape in ((9, (2, 20, 32, 32)), (10, (3, 5, 32, 32)), (11, (100, 4, 6, 6))):
        data, groupdq, pixeldq, gain, readnoise = simulate(seed, *shape, cr_fraction=0.08)
        data = (np.round(data / 50) * 50).astype(np.float32)
        gain[:] = 4.0
        assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))


@pytest.mark.parity
def test_parity_odd_inputs():
    # JUMP_DET already present (also on saturated / do-not-use groups)
    rng = np.random.default_rng(12)
    for shape in ((2, 12, 32, 32), (2, 6, 32, 32)):
        data, groupdq, pixeldq, gain, readnoise = simulate(12, *shape, cr_fraction=0.05)
        groupdq[rng.random(groupdq.shape) < 0.02] |= JUMP_DET
        assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))
    # many NaN samples, both searches
    for shape in ((2, 14, 32, 32), (3, 6, 32, 32)):
        data, *rest = simulate(13, *shape, cr_fraction=0.05)
        data[rng.random(data.shape) < 0.2] = np.nan
        assert_same_as_jwst((data, *rest))
    # several frames per group
    assert_same_as_jwst(simulate(14, 2, 15, 32, 32, cr_fraction=0.05), nframes=4)
    # zero read noise on flat data: zero sigma must not flag
    data, groupdq, pixeldq, gain, readnoise = simulate(15, 2, 8, 16, 16)
    readnoise[:8] = 0.0
    data[:, :, :4] = 1000.0
    assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))
    # non-default thresholds
    assert_same_as_jwst(simulate(16, 2, 25, 32, 32, cr_fraction=0.05), rejection_threshold=3.0,
                  min_jump_to_flag_neighbors=5.0, max_jump_to_flag_neighbors=50.0)
    assert_same_as_jwst(simulate(17, 2, 25, 32, 32, cr_fraction=0.05), min_diffs_single_pass=30,
                  three_group_rejection_threshold=4.5, four_group_rejection_threshold=4.2)


@pytest.mark.parity
def test_parity_too_few_groups_skips_with_minus_99():
    exposure = simulate(18, 2, 3, 16, 16, cr_fraction=0.1)
    _, counts = assert_same_as_jwst(exposure)
    assert counts.skipped
    data, groupdq, pixeldq, gain, readnoise = simulate(18, 2, 3, 16, 16, keep_first_group=0.0)
    _, counts = assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))
    keywords = jump.cosmic_ray_keywords(counts, jump.unusable_groups(groupdq), GROUP_TIME, 16, 16)
    assert keywords == (None, None)


# ----------------------------------------------------------------------------- banding

def banded(data, groupdq, pixeldq, gain, readnoise, edges, **params):
    """Run band by band with one halo row on interior sides; keep only the core rows."""
    nrows = data.shape[2]
    out_dq, out_pdq = groupdq.copy(), pixeldq.copy()
    frame_wide = dict(all_dnu_groups=jump.unusable_groups(groupdq),
                      median_gain=jump.exposure_median_gain(gain))
    total = jump.JumpCounts()
    for lo, hi in zip(edges[:-1], edges[1:]):
        top, bottom = max(lo - 1, 0), min(hi + 1, nrows)
        band_dq = groupdq[:, :, top:bottom].copy()
        band_pdq = pixeldq[top:bottom].copy()
        core = slice(lo - top, lo - top + hi - lo)
        total += jump.detect_jumps(data[:, :, top:bottom], band_dq, band_pdq,
                                   gain=gain[top:bottom], readnoise=readnoise[top:bottom],
                                   nframes=1, group_time=GROUP_TIME, count_rows=core,
                                   **frame_wide, **params)
        out_dq[:, :, lo:hi] = band_dq[:, :, core]
        out_pdq[lo:hi] = band_pdq[core]
    return out_dq, out_pdq, total


@pytest.mark.parametrize("shape, params", [
    ((2, 20, 60, 40), {}),
    ((3, 5, 60, 40), {}),
    ((2, 20, 60, 40), dict(after_jump_flag_dn1=100.0, after_jump_flag_time1=8.0)),
    ((100, 4, 30, 12), {}),
])
def test_bands_with_halo_match_whole_frame(shape, params):
    exposure = simulate(20, *shape, cr_fraction=0.03)
    whole_dq, whole_pdq, whole = ours(*exposure, **params)
    nrows = shape[2]
    edges = sorted({0, 1, 7, 8, 20, 33, nrows - 1, nrows} & set(range(nrows + 1)))
    band_dq, band_pdq, total = banded(*exposure, edges, **params)
    assert np.array_equal(band_dq, whole_dq)
    assert np.array_equal(band_pdq, whole_pdq)
    assert total.primary_crs == whole.primary_crs
    assert total.skipped == whole.skipped
    if whole.all_flagged_groups is not None:
        assert np.array_equal(total.all_flagged_groups, whole.all_flagged_groups)


def test_bands_sigma_clip_group_reset_needs_frame_wide_verdict():
    """A group struck everywhere but in one pixel: only the frame-wide verdict is right.

    Bands away from the unstruck pixel would judge the group "all flagged" on their own
    rows; AND-ing the verdicts each band reports and passing the result back fixes it.
    """
    data, groupdq, pixeldq, gain, readnoise = simulate(22, 100, 5, 30, 8, cr_fraction=0.005,
                                                       bad_references=False, nan_fraction=0)
    data[7, 2:] += 30000.0
    data[7, 2:, 20, 3] -= 30000.0
    whole_dq, _, whole = ours(data, groupdq, pixeldq, gain, readnoise)
    assert not whole.all_flagged_groups[7, 2]
    edges = [0, 10, 30]
    naive_dq, _, verdicts = banded(data, groupdq, pixeldq, gain, readnoise, edges)
    assert not np.array_equal(naive_dq, whole_dq)
    assert np.array_equal(verdicts.all_flagged_groups, whole.all_flagged_groups)
    band_dq, _, total = banded(data, groupdq, pixeldq, gain, readnoise, edges,
                               all_flagged_groups=verdicts.all_flagged_groups)
    assert np.array_equal(band_dq, whole_dq)
    assert total.primary_crs == whole.primary_crs


@pytest.mark.parametrize("min_columns", [1, None])
def test_internal_chunking_is_invisible(monkeypatch, min_columns):
    # None: the module's minimum block width, which splits the 150 columns 64, 64, 22
    for shape in ((2, 20, 40, 30), (3, 5, 40, 30), (100, 4, 12, 10), (100, 4, 3, 150)):
        exposure = simulate(21, *shape, cr_fraction=0.03)
        reference = ours(*exposure)
        monkeypatch.setattr(jump, "_SAMPLES_PER_CHUNK", 1)
        if min_columns is not None:
            monkeypatch.setattr(jump, "_MIN_BLOCK_COLUMNS", min_columns)
        small = ours(*exposure)
        monkeypatch.undo()
        assert np.array_equal(small[0], reference[0])
        assert small[2].primary_crs == reference[2].primary_crs


# ----------------------------------------------------------------------------- hand-made

def flat_exposure(nints=1, ngroups=10, size=5, readnoise=5.0, gain=2.0, rate=20.0):
    data = np.empty((nints, ngroups, size, size), np.float32)
    data[:] = (1000.0 + rate * np.arange(ngroups, dtype=np.float32))[None, :, None, None]
    groupdq = np.zeros(data.shape, np.uint8)
    pixeldq = np.zeros((size, size), np.uint32)
    return (data, groupdq, pixeldq, np.full((size, size), gain, np.float32),
            np.full((size, size), readnoise, np.float32))


def sigma_electrons(readnoise=5.0, gain=2.0, rate=20.0):
    return float(np.sqrt(rate * gain + (readnoise * gain) ** 2))


@pytest.mark.parametrize("ngroups", [12, 5])  # single pass and iterative search
def test_one_step_flags_exactly_its_group_and_four_neighbours(ngroups):
    data, groupdq, pixeldq, gain, readnoise = flat_exposure(ngroups=ngroups)
    step_dn = 50 * sigma_electrons() / 2.0          # 50 sigma, in DN
    data[0, 3:, 2, 2] += step_dn
    flags, _, counts = ours(data, groupdq, pixeldq, gain, readnoise)
    jumped = np.argwhere(flags & JUMP_DET)
    expected = {(0, 3, 2, 2), (0, 3, 1, 2), (0, 3, 3, 2), (0, 3, 2, 1), (0, 3, 2, 3)}
    assert {tuple(x) for x in jumped} == expected
    assert counts.primary_crs == 1


def test_huge_step_does_not_flag_neighbours():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure()
    data[0, 4:, 2, 2] += 2000 * sigma_electrons() / 2.0
    flags, _, _ = ours(data, groupdq, pixeldq, gain, readnoise)
    assert [tuple(x) for x in np.argwhere(flags & JUMP_DET)] == [(0, 4, 2, 2)]


def test_neighbours_skip_saturated_and_do_not_use_and_frame_edges():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure()
    data[0, 4:, 0, 2] += 50 * sigma_electrons() / 2.0   # on the top edge
    groupdq[0, 4, 0, 1] |= SATURATED
    groupdq[0, 4, 1, 2] |= DO_NOT_USE
    flags, _, _ = ours(data, groupdq, pixeldq, gain, readnoise)
    assert {tuple(x) for x in np.argwhere(flags & JUMP_DET)} == {(0, 4, 0, 2), (0, 4, 0, 3)}


def test_small_step_is_not_flagged_and_flags_stay_in_their_bit():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure()
    data[0, 4:, 2, 2] += 3 * sigma_electrons() / 2.0
    groupdq[0, 0] |= DO_NOT_USE
    flags, _, _ = ours(data, groupdq, pixeldq, gain, readnoise)
    assert np.array_equal(flags, groupdq)


def test_bad_gain_marks_pixeldq_and_data_is_untouched():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure()
    gain[1, 1] = np.nan
    gain[2, 3] = 0.0
    before = data.copy()
    _, flagged_pdq, _ = ours(data, groupdq, pixeldq, gain, readnoise)
    bad = np.uint32(PIXEL["NO_GAIN_VALUE"] | DO_NOT_USE)
    assert flagged_pdq[1, 1] == bad and flagged_pdq[2, 3] == bad
    assert np.count_nonzero(flagged_pdq) == 2
    assert np.array_equal(data, before)


def test_after_jump_flags_following_groups():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure(ngroups=12)
    data[0, 3:, 2, 2] += 2000 * sigma_electrons() / 2.0
    flags, _, _ = ours(data, groupdq, pixeldq, gain, readnoise,
                       after_jump_flag_dn1=100.0, after_jump_flag_time1=3 * GROUP_TIME + 0.1)
    assert [g for g in range(12) if flags[0, g, 2, 2] & JUMP_DET] == [3, 4, 5, 6]


def test_unimplemented_options_and_short_ramps_are_refused():
    exposure = flat_exposure()
    with pytest.raises(NotImplementedError, match="find_showers"):
        ours(*exposure, find_showers=True)
    with pytest.raises(NotImplementedError):
        ours(*exposure, expand_large_events=True)
    with pytest.raises(ValueError):
        ours(*flat_exposure(ngroups=2))


def test_cosmic_ray_keywords_formula():
    dead = np.zeros((2, 10), bool)
    dead[:, 0] = dead[:, -1] = True
    counts = jump.JumpCounts(primary_crs=50, extended_events=2)
    prime, extended = jump.cosmic_ray_keywords(counts, dead, 2.5, 10, 20)
    seconds_pixels = 2.5 * (20 - 4 - 2) * 200
    assert prime == pytest.approx(1000 * 50 / seconds_pixels)
    assert extended == pytest.approx(1e6 * 2 / seconds_pixels)
    skipped = jump.cosmic_ray_keywords(jump.JumpCounts(skipped=True), dead, 2.5, 10, 20)
    assert skipped[0] == pytest.approx(-99 * 1000 / seconds_pixels)


# ----------------------------------------------------------------------------- compiled loops

@pytest.mark.parity
def test_parity_degenerate_shapes_and_dead_pixels():
    """One pixel, one row, one column; pixels unusable throughout, all-NaN pixels and
    stale JUMP_DET bits on unusable groups, in the single-pass and iterative searches."""
    for seed, shape in ((30, (2, 12, 1, 1)), (31, (2, 12, 1, 70)), (32, (2, 12, 70, 1)),
                        (33, (3, 5, 1, 9)), (34, (1, 4, 1, 1))):
        data, groupdq, pixeldq, gain, readnoise = simulate(seed, *shape, cr_fraction=0.1,
                                                           bad_references=False)
        nrows, ncols = shape[2:]
        groupdq[:, 1::3, 0, 0] |= JUMP_DET
        if nrows * ncols > 1:
            groupdq[:, :, 0, 0] |= DO_NOT_USE
            data[:, :, -1, -1] = np.nan
            groupdq[:, :, -1, -1] |= JUMP_DET
        assert_same_as_jwst((data, groupdq, pixeldq, gain, readnoise))


def _reference_differences(data, groupdq, gain):
    """The definition the compiled loop follows, in numpy: [pixels, nints*ndiffs]."""
    electrons = (data * gain).astype(np.float32)
    electrons[(groupdq & (SATURATED | DO_NOT_USE)) != 0] = np.nan
    diffs = electrons[:, 1:] - electrons[:, :-1]
    nints, ndiffs = diffs.shape[:2]
    return diffs.reshape(nints * ndiffs, -1).T


def test_pixel_major_differences_nan_inf_unusable_and_views():
    data, groupdq, _, gain, _ = simulate(40, 3, 7, 9, 70, nan_fraction=0.05)
    data[0, 2, 3, 4] = np.inf
    data[1, 3:5, 5, 6] = np.inf                          # inf - inf
    gain[2, 2] = np.nan
    groupdq[:, :, 4, 4] |= SATURATED                     # a pixel with nothing usable
    # a row band of a bigger buffer whose integration and group axes are swapped
    big = np.full((7, 3, 20, 70), -1.0, np.float32)
    big[:, :, 5:14] = data.transpose(1, 0, 2, 3)
    big_dq = np.full((7, 3, 20, 70), 255, np.uint8)
    big_dq[:, :, 5:14] = groupdq.transpose(1, 0, 2, 3)
    view, view_dq = big[:, :, 5:14].transpose(1, 0, 2, 3), big_dq[:, :, 5:14].transpose(1, 0, 2, 3)
    with np.errstate(invalid="ignore"):
        expected = _reference_differences(data, groupdq, gain)
        for args in ((data, groupdq, gain), (view, view_dq, gain)):
            diffs = jump._pixel_major_differences(*args)
            assert diffs.flags.c_contiguous
            np.testing.assert_array_equal(diffs, expected)   # NaN where NaN, bit-equal elsewhere
    assert np.isnan(diffs[4 * 70 + 4]).all() and np.isnan(diffs[2 * 70 + 2]).all()


@pytest.mark.parametrize("shape, params", [
    ((2, 20, 30, 70), {}),
    ((3, 5, 30, 70), {}),
    ((2, 20, 30, 70), dict(after_jump_flag_dn1=100.0, after_jump_flag_time1=8.0)),
    ((100, 4, 8, 12), {}),
    ((2, 20, 30, 70), dict(flag_4_neighbors=False)),
])
def test_band_views_match_contiguous_arrays(shape, params):
    """The engine hands over row bands of bigger buffers: the strides must be honoured."""
    data, groupdq, pixeldq, gain, readnoise = simulate(41, *shape, cr_fraction=0.03)
    groupdq[np.random.default_rng(41).random(groupdq.shape) < 0.01] |= JUMP_DET
    reference = ours(data, groupdq, pixeldq, gain, readnoise, **params)
    nints, ngroups, nrows, ncols = shape
    pad = 3
    big = np.zeros((nints, ngroups, nrows + 2 * pad, ncols), np.float32)
    big_dq = np.full(big.shape, 255, np.uint8)
    big_gain = np.zeros((nrows + 2 * pad, ncols), np.float32)
    big_rn = np.zeros_like(big_gain)
    band = slice(pad, pad + nrows)
    big[:, :, band], big_dq[:, :, band] = data, groupdq
    big_gain[band], big_rn[band] = gain, readnoise
    band_pdq = pixeldq.copy()
    counts = jump.detect_jumps(big[:, :, band], big_dq[:, :, band], band_pdq, gain=big_gain[band],
                               readnoise=big_rn[band], nframes=1, group_time=GROUP_TIME, **params)
    assert np.array_equal(big_dq[:, :, band], reference[0])
    assert np.all(big_dq[:, :, :pad] == 255) and np.all(big_dq[:, :, pad + nrows:] == 255)
    assert np.array_equal(band_pdq, reference[1])
    assert counts.primary_crs == reference[2].primary_crs


def test_all_unusable_pixel_loses_stale_flags_and_flags_no_neighbours():
    data, groupdq, pixeldq, gain, readnoise = flat_exposure(ngroups=12)
    data[0, 5:, 2, 2] += 50 * sigma_electrons() / 2.0
    groupdq[0, :, 2, 2] |= SATURATED
    groupdq[0, 3:6, 2, 2] |= JUMP_DET                  # stale: counted, then removed
    data[0, :, 0, 0] = np.nan                          # no usable difference at all
    flags, _, counts = ours(data, groupdq, pixeldq, gain, readnoise)
    assert not np.any(flags & JUMP_DET)
    assert counts.primary_crs == 3
    assert np.array_equal(flags, groupdq & ~np.uint8(JUMP_DET))


def test_other_dtypes_and_layouts():
    exposure = simulate(42, 2, 12, 16, 20, cr_fraction=0.05)
    data, groupdq, pixeldq, gain, readnoise = exposure
    reference = ours(*exposure)
    as_float64 = ours(data.astype(np.float64), groupdq, pixeldq, gain.astype(np.float64),
                      np.asfortranarray(readnoise))
    assert np.array_equal(as_float64[0], reference[0])
    assert as_float64[2].primary_crs == reference[2].primary_crs
    # groupdq is flagged in place: a layout the loops cannot take is refused, not copied
    with pytest.raises(ValueError):
        jump.detect_jumps(data, np.asfortranarray(groupdq), pixeldq.copy(), gain=gain,
                          readnoise=readnoise, nframes=1, group_time=GROUP_TIME)


def test_kernel_calls_are_checked_against_their_headers():
    """jump.h / jump_sigclip.h declare the kernels: a buffer of the wrong element type is
    a TypeError at the call, not memory read as something else."""
    data = np.zeros((1, 3, 2, 4), np.float32)
    groupdq = np.zeros(data.shape, np.uint8)
    with pytest.raises(TypeError):
        jump._pixel_major_differences(data, groupdq, np.ones((2, 4), np.float64))
    with pytest.raises(TypeError):
        jump._flagged_everywhere(groupdq.astype(np.uint16))
    diffs = jump._pixel_major_differences(data, groupdq, np.ones((2, 4), np.float32))
    assert diffs.shape == (8, 2) and np.all(diffs == 0)

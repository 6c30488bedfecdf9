"""refpix's compiled reference-level measurement (``streamdet_refpix_measure`` in
streamdet/_ckernels/refpix.c, behind ``measure_reference_drift``) against the numpy code
it replaced, bit for bit and dtype for dtype, on realistic and awkward reference columns:
every sample length 1..1100, NaN, inf, constant samples (the float64 fallback), signed
zeros, overflowing values, samples of one and two pixels, DO_NOT_USE pixels, both row
groupings and clip limits other than 3."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamdet.algorithms.refpix import measure_reference_drift
from streamdet.core.dqflags import DO_NOT_USE

NCOLS = 1032


# -- the numpy code measure_reference_drift ran before the C kernel (the reference) -------

def _numpy_clipped_mean(sample_source, good, limit):
    if good.size == 0:
        return None
    sample = sample_source[good]
    if np.std(sample, dtype=np.float64) != 0.0:
        kept = _numpy_sigmaclip(sample, limit, limit)
        return kept.mean()
    return sample.mean(dtype=np.float64)


def _numpy_sigmaclip(sample, low, high):
    kept = np.ravel(sample)
    while True:
        spread = np.std(kept)
        centre = np.mean(kept)
        size = kept.size
        kept = kept[(kept >= centre - spread * low) & (kept <= centre + spread * high)]
        if kept.size == size:
            return kept


def _numpy_row_corrections(reference, usable, row_sets, limit, ncols):
    signals = []
    for k, rows in enumerate(row_sets):
        per_amp = []
        for amp in range(4):
            left = _numpy_clipped_mean(reference[rows, amp], usable[k][amp], limit)
            right = _numpy_clipped_mean(reference[rows, amp + 4], usable[k][amp + 4], limit)
            per_amp.append(0.5 * (left + right))
        signals.append(per_amp)
    wide = any(np.asarray(s).dtype != np.float32 for per_amp in signals for s in per_amp)
    rows_out = np.empty((len(row_sets), ncols), dtype=np.float64 if wide else np.float32)
    for k, per_amp in enumerate(signals):
        for amp in range(4):
            rows_out[k, amp::4] = per_amp[amp]
    return rows_out


def numpy_measure_reference_drift(columns, pixeldq, ncols, *, odd_even_rows=True,
                                  siglimit=3.0):
    ngroups, nrows = columns.shape[:2]
    row_sets = ([slice(0, nrows, 2), slice(1, nrows, 2)] if odd_even_rows
                else [slice(0, nrows)])
    usable = [[np.flatnonzero((pixeldq[rows, c] & np.uint32(DO_NOT_USE)) == 0)
               for c in range(pixeldq.shape[1])] for rows in row_sets]
    notes = []
    if ngroups > 1:
        for amp in range(4):
            for side in (amp, amp + 4):
                if odd_even_rows:
                    if usable[0][side].size == 0:
                        notes.append(f"Odd rows for amplifier {'ABCD'[amp]} have no good "
                                     "reference pixels")
                    elif usable[1][side].size == 0:
                        notes.append(f"Even rows for amplifier {'ABCD'[amp]} have no good "
                                     "reference pixels")
                elif usable[0][side].size == 0:
                    notes.append(f"Amplifier {'ABCD'[amp]} has no good reference pixels")
    if notes:
        notes.append("Group 1 has no reference pixels")
    if notes or ngroups < 2:
        return None, tuple(notes)
    first = columns[0]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)   # empty clips, as before
        rows = [_numpy_row_corrections(columns[g] - first, usable, row_sets, siglimit, ncols)
                for g in range(1, ngroups)]
    dtype = np.float64 if any(r.dtype == np.float64 for r in rows) else np.float32
    return np.stack([r.astype(dtype, copy=False) for r in rows]), tuple(notes)


# -- comparison ---------------------------------------------------------------------------

def assert_same_measurement(columns, pixeldq, ncols=NCOLS, **params):
    expected, expected_notes = numpy_measure_reference_drift(columns, pixeldq, ncols, **params)
    before = columns.copy()
    got, notes = measure_reference_drift(columns, pixeldq, ncols, **params)
    assert np.array_equal(columns, before, equal_nan=True)
    assert notes == expected_notes
    if expected is None:
        assert got is None
        return
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bits = np.uint64 if got.dtype == np.float64 else np.uint32
    differ = got.view(bits) != expected.view(bits)
    assert not differ.any(), (
        f"{np.count_nonzero(differ)} of {differ.size} corrections differ, first at "
        f"{np.argwhere(differ)[0]}: {got[differ][0]!r} vs {expected[differ][0]!r}")


def drifting_columns(rng, ngroups, nrows, *, outliers=0.02, noise=5.0):
    """Reference columns with read noise, a drift per group and column, and outliers."""
    drift = np.cumsum(rng.normal(0, 3, (ngroups, 1, 8)), axis=0)
    columns = 14000 + drift + rng.normal(0, noise, (ngroups, nrows, 8))
    hit = rng.random(columns.shape) < outliers
    columns[hit] += rng.normal(0, 40 * noise, np.count_nonzero(hit))
    return columns.astype(np.float32)


def scattered_dnu(rng, nrows, fraction=0.02):
    pixeldq = np.zeros((nrows, 8), np.uint32)
    pixeldq[rng.random((nrows, 8)) < fraction] = DO_NOT_USE
    return pixeldq


# -- realistic ----------------------------------------------------------------------------

@pytest.mark.parametrize("odd_even_rows", [True, False])
def test_full_frame_integration(odd_even_rows):
    rng = np.random.default_rng(11)
    columns = drifting_columns(rng, 12, 1024)
    columns[rng.integers(1, 12, 5), rng.integers(0, 1024, 5), rng.integers(0, 8, 5)] = np.nan
    assert_same_measurement(columns, scattered_dnu(rng, 1024), odd_even_rows=odd_even_rows)


def test_every_sample_length_up_to_1100():
    """Sample lengths cross every branch of the pairwise sum (under 8, blocks up to 128,
    the halving split at multiples of 8) and clip rounds remove outliers at each length."""
    rng = np.random.default_rng(12)
    for nrows in range(1, 1101):
        columns = drifting_columns(rng, 2, nrows, outliers=0.05,
                                   noise=float(10 ** rng.uniform(-2, 3)))
        assert_same_measurement(columns, np.zeros((nrows, 8), np.uint32),
                                odd_even_rows=False)


@pytest.mark.parametrize("nrows", [1025, 1031, 2048])
def test_odd_and_long_row_counts(nrows):
    rng = np.random.default_rng(nrows)
    columns = drifting_columns(rng, 3, nrows, outliers=0.05)
    for odd_even_rows in (True, False):
        assert_same_measurement(columns, scattered_dnu(rng, nrows), odd_even_rows=odd_even_rows)


@pytest.mark.parametrize("siglimit", [3.0, 2.5, 2.7, 1.0, 0.5, 0.0, -1.0, 10.0, 2, 1e-30,
                                      1e39, float("nan"),
                                      np.float32(2.7), np.float64(2.7), np.float64(1.3),
                                      np.int64(2), np.float16(2.7)])
def test_clip_limits(siglimit):
    """A Python number rounds to a float32 limit and float32 bounds; a NumPy float64 or
    integer limit makes float64 bounds."""
    rng = np.random.default_rng(13)
    columns = drifting_columns(rng, 4, 300, outliers=0.1)
    for odd_even_rows in (True, False):
        assert_same_measurement(columns, scattered_dnu(rng, 300), siglimit=siglimit,
                                odd_even_rows=odd_even_rows)


def _samples_on_a_lower_bound(rng, count, size=16):
    """Samples of ``size`` values whose lowest sits on the float32 lower clip bound at 3
    sigma of the whole sample (the bound found by iterating it in numpy's float32)."""
    samples = []
    for _ in range(count):
        base = rng.normal(0, 1, size - 1).astype(np.float32)
        low = np.float32(-4)
        for _ in range(30):
            sample = np.append(base, low)
            bound = np.mean(sample) - np.std(sample) * 3.0
            if bound == low:
                break
            low = bound
        samples.append(np.append(base, low))
    return np.array(samples)


def test_float32_and_float64_clip_bounds_keep_different_values():
    """On samples whose lowest value sits on the float32 bound, float32 and float64
    bounds keep different values; the kernel follows each."""
    samples = _samples_on_a_lower_bound(np.random.default_rng(21), 64)
    kept_f32 = [_numpy_sigmaclip(s, 3.0, 3.0).size for s in samples]
    kept_f64 = [_numpy_sigmaclip(s, np.float64(3.0), np.float64(3.0)).size for s in samples]
    assert kept_f32 != kept_f64
    # differences from a zero group 0: column c of group g holds sample 8 * g + c
    size = samples.shape[1]
    columns = np.zeros((1 + len(samples) // 8, size, 8), np.float32)
    columns[1:] = samples.reshape(-1, 8, size).transpose(0, 2, 1)
    for siglimit in (3.0, np.float64(3.0), np.float32(3.0)):
        assert_same_measurement(columns, np.zeros((size, 8), np.uint32), siglimit=siglimit,
                                odd_even_rows=False)
    # the same samples on even rows, noise on odd ones
    doubled = np.repeat(columns, 2, axis=1)
    doubled[1:, 1::2] = np.random.default_rng(22).normal(0, 1, (len(columns) - 1, size, 8))
    assert_same_measurement(doubled, np.zeros((2 * size, 8), np.uint32))
    assert_same_measurement(doubled, np.zeros((2 * size, 8), np.uint32),
                            siglimit=np.float64(3.0))


def test_float64_columns_are_refused():
    columns = drifting_columns(np.random.default_rng(1), 2, 8).astype(np.float64)
    with pytest.raises(TypeError, match="float32"):
        measure_reference_drift(columns, np.zeros((8, 8), np.uint32), NCOLS)


def test_an_unsupported_limit_type_is_refused():
    columns = drifting_columns(np.random.default_rng(1), 2, 8)
    with pytest.raises(TypeError, match="siglimit"):
        measure_reference_drift(columns, np.zeros((8, 8), np.uint32), NCOLS,
                                siglimit=np.longdouble(3))


# -- awkward ------------------------------------------------------------------------------

def test_constant_samples_take_the_float64_mean():
    """A constant side gives a float64 level (the whole table turns float64), alone or
    with a clipped float32 side; constant zeros of either sign average to +0.0."""
    rng = np.random.default_rng(14)
    columns = drifting_columns(rng, 5, 64)
    columns[:, :, 2] = 7.25                     # amplifier C left: constant in every group
    columns[3, :, 5] = columns[0, :, 5]         # amplifier B right, group 3: difference 0
    columns[4, ::2, 0] = -0.0                   # amplifier A left, even rows of group 4: -0
    columns[0, ::2, 0] = 0.0
    # a constant nonzero difference (exact: 1024 is a multiple of these values' ulp),
    # averaged in float64 with a float32 clipped mean that float32 would round
    columns[2, 1::2, 4] = columns[0, 1::2, 4] + 1024
    got, _ = measure_reference_drift(columns, np.zeros((64, 8), np.uint32), NCOLS)
    assert got.dtype == np.float64
    assert_same_measurement(columns, np.zeros((64, 8), np.uint32))
    assert_same_measurement(columns, np.zeros((64, 8), np.uint32), odd_even_rows=False)


def test_signed_zeros():
    """numpy's float32 sums start from +0.0: a clip that keeps only -0.0 has mean +0.0."""
    nrows = 40
    columns = np.zeros((4, nrows, 8), np.float32)
    columns[1] = -0.0                           # (-0) - (+0) = -0 everywhere
    columns[2, ::3] = -0.0
    columns[2, 5, 3] = 1.0
    columns[2, 8, 7] = -2.0
    columns[3] = -0.0
    columns[3, 4, [2, 6]] = 5.0                 # clipped away from 19 values of -0.0
    assert_same_measurement(columns, np.zeros((nrows, 8), np.uint32))
    assert_same_measurement(columns, np.zeros((nrows, 8), np.uint32), odd_even_rows=False)


def test_nan_and_inf_in_the_reference_columns():
    rng = np.random.default_rng(15)
    columns = drifting_columns(rng, 6, 100)
    columns[1, 10, 0] = np.nan                  # one NaN in a later group
    columns[0, 20, 1] = np.nan                  # one in group 0: NaN in every group
    columns[2, 30, 2] = np.inf
    columns[3, 31, 3] = -np.inf
    columns[4, 40, 4] = np.inf
    columns[4, 42, 4] = -np.inf
    columns[5, :, 5] = np.nan                   # a whole column
    columns[5, 1::2, 6] = np.inf                # a whole parity
    assert_same_measurement(columns, scattered_dnu(rng, 100))
    assert_same_measurement(columns, scattered_dnu(rng, 100), odd_even_rows=False)
    # a NaN made harmless by DO_NOT_USE
    pixeldq = np.zeros((100, 8), np.uint32)
    pixeldq[[10, 20, 30, 31, 40, 42], [0, 1, 2, 3, 4, 4]] = DO_NOT_USE
    assert_same_measurement(columns, pixeldq)


def test_overflowing_and_tiny_values():
    """Float32 sums and squares that overflow to inf, and subnormal differences."""
    rng = np.random.default_rng(16)
    nrows = 64
    columns = np.zeros((4, nrows, 8), np.float32)
    columns[1] = rng.choice([3e38, -3e38, 1e38], (nrows, 8)).astype(np.float32)
    columns[2] = (rng.normal(0, 1, (nrows, 8)) * 1e20).astype(np.float32)   # squares overflow
    columns[3] = (rng.integers(-3, 4, (nrows, 8)) * np.float32(1e-45)).astype(np.float32)
    columns[3, ::2, :4] = rng.normal(0, 1e-38, (nrows // 2, 4)).astype(np.float32)
    assert_same_measurement(columns, np.zeros((nrows, 8), np.uint32))
    assert_same_measurement(columns, np.zeros((nrows, 8), np.uint32), odd_even_rows=False)


@pytest.mark.parametrize("kept", [1, 2, 3])
def test_samples_of_one_two_and_three_pixels(kept):
    rng = np.random.default_rng(17 + kept)
    nrows = 50
    columns = drifting_columns(rng, 4, nrows)
    pixeldq = np.full((nrows, 8), DO_NOT_USE | 4, np.uint32)
    for c in range(8):
        for parity in (0, 1):
            rows = rng.choice(np.arange(parity, nrows, 2), kept, replace=False)
            pixeldq[rows, c] = 4                # other bits do not matter
    assert_same_measurement(columns, pixeldq)
    assert_same_measurement(columns, pixeldq, odd_even_rows=False)
    columns[2, :, 1] = np.nan
    assert_same_measurement(columns, pixeldq)


def test_missing_reference_pixels_and_single_group():
    rng = np.random.default_rng(18)
    columns = drifting_columns(rng, 3, 20)
    pixeldq = np.zeros((20, 8), np.uint32)
    pixeldq[1::2, 6] = DO_NOT_USE
    pixeldq[:, 1] = DO_NOT_USE
    for odd_even_rows in (True, False):
        assert_same_measurement(columns, pixeldq, odd_even_rows=odd_even_rows)
        assert_same_measurement(columns[:1], pixeldq, odd_even_rows=odd_even_rows)
        assert_same_measurement(columns[:1], np.zeros((20, 8), np.uint32),
                                odd_even_rows=odd_even_rows)
    assert_same_measurement(columns[:, :1], np.zeros((1, 8), np.uint32))   # no odd rows
    assert_same_measurement(columns[:, :1], np.zeros((1, 8), np.uint32), odd_even_rows=False)


def test_strided_and_wider_inputs():
    """A non-contiguous view of the columns, and columns/DQ wider than 8 (only the
    first 8 count), as a caller might pass them."""
    rng = np.random.default_rng(19)
    wide = drifting_columns(rng, 4, 60)
    frame = np.repeat(wide, 2, axis=2)          # 16 columns
    assert_same_measurement(frame[:, :, ::2], scattered_dnu(rng, 60))
    assert_same_measurement(frame[:, ::-1], np.tile(scattered_dnu(rng, 60), 2))
    assert_same_measurement(frame[::2], np.zeros((60, 16), np.uint32), ncols=20)


def test_an_odd_column_count_fills_every_column():
    rng = np.random.default_rng(20)
    assert_same_measurement(drifting_columns(rng, 3, 30), np.zeros((30, 8), np.uint32),
                            ncols=1030)


_awkward_values = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 2.5, 1e-45, -1e-45, 1e-38, 3e38, -3e38, 14000.0, 14000.5,
     np.inf, -np.inf, np.nan])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(columns=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 40),
                                                st.just(8)),
                          elements=st.one_of(
                              _awkward_values,
                              st.floats(-20000, 20000, width=32),
                              st.integers(-3, 3).map(float))),
       dnu_fraction=st.sampled_from([0.0, 0.1, 0.6]),
       seed=st.integers(0, 2**32 - 1),
       odd_even_rows=st.booleans(),
       siglimit=st.sampled_from([3.0, 1.5, 0.3, np.float64(2.2)]))
def test_random_awkward_columns(columns, dnu_fraction, seed, odd_even_rows, siglimit):
    rng = np.random.default_rng(seed)
    pixeldq = scattered_dnu(rng, columns.shape[1], dnu_fraction)
    assert_same_measurement(columns, pixeldq, odd_even_rows=odd_even_rows, siglimit=siglimit)

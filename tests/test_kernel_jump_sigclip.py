"""The compiled sigma-clip search of jump (streamdet/_ckernels/jump_sigclip.c) against
the numpy formulation it replaced, bit for bit, on random and edge-case differences."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from streamdet._ckernels import ptr
from streamdet.algorithms import jump
from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, SATURATED

ROUNDS = 5


def numpy_sigma_clip(diffs, shape, n_sigma, only_use_ints):
    """The numpy code jump used before the C kernel (kept here as the reference); also
    returns each clipped row's last bounds."""
    nints, ngroups, nrows, ncols = shape
    ndiffs = ngroups - 1
    if only_use_ints:
        per_int = diffs.reshape(nrows * ncols, nints, ndiffs).transpose(2, 0, 1)
        samples = np.ascontiguousarray(per_int.reshape(ndiffs * nrows * ncols, nints),
                                       dtype=np.float64)
    else:
        samples = diffs.astype(np.float64)
    usable = np.isfinite(samples)
    kept = usable.copy()
    low = np.full(samples.shape[0], np.nan)
    high = np.full(samples.shape[0], np.nan)
    todo = np.arange(samples.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(ROUNDS):
            values = samples[todo]
            keep = kept[todo]
            n_kept = np.count_nonzero(keep, axis=1)
            with warnings.catch_warnings():  # rows with nothing kept: NaN, as wanted
                warnings.simplefilter("ignore", RuntimeWarning)
                centre = np.nanmedian(np.where(keep, values, np.nan), axis=1)
            mean = np.sum(values, axis=1, where=keep) / n_kept
            spread = values - mean[:, None]
            spread *= spread
            std = np.sqrt(np.sum(spread, axis=1, where=keep) / n_kept)
            lo = centre - n_sigma * std
            hi = centre + n_sigma * std
            low[todo] = lo
            high[todo] = hi
            keep &= (values >= lo[:, None]) & (values <= hi[:, None])
            kept[todo] = keep
            n_now = np.count_nonzero(keep, axis=1)
            todo = todo[(n_now != n_kept) & (n_now > 0)]
            if not todo.size:
                break
        rejected = (samples < low[:, None]) | (samples > high[:, None])
    rejected &= usable
    mask = np.ascontiguousarray(rejected.T).reshape(nints, ndiffs, nrows, ncols)
    return mask, np.stack([low, high], axis=1)


def compiled_sigma_clip(diffs, shape, n_sigma, only_use_ints, groupdq=None, with_bounds=True):
    """The C kernel through the step's wrapper: the JUMP_DET it sets in a groupdq band
    view (clean unless given) and the bounds it can report for tests (None without
    ``with_bounds``: the step's call, which skips the first round's median where it
    provably clips nothing)."""
    nints, ngroups, nrows, ncols = shape
    rows = nrows * ncols * ((ngroups - 1) if only_use_ints else 1)
    if groupdq is None:
        parent = np.zeros((nints, ngroups + 1, nrows + 2, ncols + 3), np.uint8)
        groupdq = parent[:, 1:, 1:-1, 2:-1]  # a view with the engine's kind of strides
    bounds = np.empty((rows, 2)) if with_bounds else None
    jump._sigma_clip_flag(diffs, groupdq, n_sigma, only_use_ints, bounds)
    return (groupdq[:, 1:] & JUMP_DET) != 0, bounds


def random_diffs(rng, nints, ndiffs, npix, kind):
    width = nints * ndiffs
    if kind == "normal":
        d = rng.normal(50, 10, (npix, width))
    elif kind == "outliers":
        d = rng.normal(50, 10, (npix, width))
        hit = rng.random(d.shape) < 0.05
        d[hit] += rng.exponential(200, hit.sum()) * rng.choice([-1, 1], hit.sum())
    elif kind == "integers":  # many ties, values exactly on the bounds
        d = rng.integers(-3, 4, (npix, width)).astype(float)
    elif kind == "constant":  # std 0: nothing but the centre survives
        d = np.full((npix, width), 7.0)
        d[:, ::5] = 8.0
    elif kind == "wide":  # magnitudes where summation order shows in the last bits
        d = rng.normal(0, 1, (npix, width)) * 10.0 ** rng.integers(-6, 7, (npix, width))
    else:
        raise ValueError(kind)
    d = d.astype(np.float32)
    nan = rng.random(d.shape) < rng.choice([0.0, 0.02, 0.3, 0.9])
    d[nan] = np.nan
    d[rng.integers(0, npix, max(1, npix // 10))] = np.nan  # rows with nothing usable
    if npix > 3:
        d[1, : width // 2] = np.inf  # not finite: never usable, never flagged
        d[2, 1::2] = -np.inf
    return np.ascontiguousarray(d)


@pytest.mark.parametrize("only_use_ints", [True, False])
@pytest.mark.parametrize("kind", ["normal", "outliers", "integers", "constant", "wide"])
@pytest.mark.parametrize("nints,ngroups", [(1, 2), (3, 4), (7, 3), (9, 2), (100, 6),
                                           (129, 3), (260, 2), (500, 4)])
def test_compiled_clip_matches_numpy_bit_for_bit(nints, ngroups, kind, only_use_ints):
    rng = np.random.default_rng(hash((nints, ngroups, kind, only_use_ints)) % 2**32)
    nrows, ncols = 3, 5
    diffs = random_diffs(rng, nints, ngroups - 1, nrows * ncols, kind)
    for n_sigma in (4.0, 1.0, 0.5, 0.0):
        shape = (nints, ngroups, nrows, ncols)
        expected, expected_bounds = numpy_sigma_clip(diffs, shape, n_sigma, only_use_ints)
        got, bounds = compiled_sigma_clip(diffs, shape, n_sigma, only_use_ints)
        np.testing.assert_array_equal(got, expected)
        # the bounds bit for bit (NaN where nothing was usable), not merely the same mask
        np.testing.assert_array_equal(np.isnan(bounds), np.isnan(expected_bounds))
        finite = ~np.isnan(bounds)
        np.testing.assert_array_equal(bounds[finite].view(np.int64),
                                      expected_bounds[finite].view(np.int64))
        # as the step calls it (no bounds asked for): the same flags
        got, _ = compiled_sigma_clip(diffs, shape, n_sigma, only_use_ints, with_bounds=False)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n_sigma", [4.0, 3.0, 2.5])
def test_clip_without_bounds_on_many_ramps(n_sigma):
    """Rows that keep everything, rows whose median sits near the edge of what the
    shortcut can prove, rows with a jump or two, and ties on the bounds: the step's
    call (no bounds, shortcut on) flags what the numpy formulation flags."""
    rng = np.random.default_rng(int(n_sigma * 10))
    nints, ngroups, nrows, ncols = 100, 5, 20, 30
    ndiffs = ngroups - 1
    npix = nrows * ncols
    diffs = rng.normal(20, 5, (npix, nints * ndiffs))
    diffs[::7] = np.round(diffs[::7])  # ties
    diffs[::11] = rng.standard_t(3, diffs[::11].shape) * 5  # heavy tails
    hit = rng.random(diffs.shape) < 0.01
    diffs[hit] += rng.exponential(100, hit.sum())
    diffs = np.ascontiguousarray(diffs.astype(np.float32))
    shape = (nints, ngroups, nrows, ncols)
    for only_use_ints in (True, False):
        expected, _ = numpy_sigma_clip(diffs, shape, n_sigma, only_use_ints)
        assert expected.any() and not expected.all()
        got, _ = compiled_sigma_clip(diffs, shape, n_sigma, only_use_ints, with_bounds=False)
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("only_use_ints", [True, False])
def test_clip_flags_only_usable_groups_and_keeps_other_bits(only_use_ints):
    rng = np.random.default_rng(7)
    nints, ngroups, nrows, ncols = 120, 4, 2, 3
    shape = (nints, ngroups, nrows, ncols)
    diffs = random_diffs(rng, nints, ngroups - 1, nrows * ncols, "outliers")
    groupdq = rng.choice(np.array([0, 0, 0, SATURATED, DO_NOT_USE, 2, 128], np.uint8), shape)
    before = groupdq.copy()
    clipped, _ = numpy_sigma_clip(diffs, shape, 2.0, only_use_ints)
    assert clipped.any()
    compiled_sigma_clip(diffs, shape, 2.0, only_use_ints, groupdq)
    expected = before.copy()
    usable = (before[:, 1:] & (SATURATED | DO_NOT_USE)) == 0
    expected[:, 1:][clipped & usable] |= JUMP_DET
    np.testing.assert_array_equal(groupdq, expected)
    assert (clipped & ~usable).any()  # some clipped differences were left unflagged


def numpy_flagged_everywhere(groupdq):
    """The numpy code of jump's group-reset verdict before the C kernel."""
    nints, ngroups = groupdq.shape[:2]
    planes = groupdq.reshape(nints, ngroups, -1)
    return np.all((planes & np.uint8(JUMP_DET | DO_NOT_USE)) != 0, axis=2)


@pytest.mark.parametrize("seed", range(6))
def test_flagged_everywhere_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    nints, ngroups, nrows, ncols = 4, 5, 6, 7
    # a wider parent, so the band view has non-trivial strides like the engine's
    parent = rng.choice(np.array([0, JUMP_DET, DO_NOT_USE, SATURATED, JUMP_DET | SATURATED],
                                 np.uint8), (nints, ngroups + 2, nrows + 3, ncols))
    groupdq = parent[:, 1:-1, 2:-1]
    # planes flagged everywhere (with JUMP_DET or DO_NOT_USE) but for one pixel, which
    # sits in a row some selections leave out
    groupdq[1, 2] = JUMP_DET
    groupdq[2] = DO_NOT_USE | SATURATED
    groupdq[3, 4] = JUMP_DET
    groupdq[3, 4, 4, 6] = SATURATED
    for rows_used in (None, np.ones(nrows, bool), np.arange(nrows) != 4,
                      np.arange(nrows) < 3, np.zeros(nrows, bool)):
        picked = groupdq if rows_used is None else groupdq[:, :, rows_used]
        expected = numpy_flagged_everywhere(picked)
        got = jump._flagged_everywhere(groupdq, rows_used)
        np.testing.assert_array_equal(got, expected)
    assert jump._flagged_everywhere(groupdq)[1, 2] and not jump._flagged_everywhere(groupdq)[3, 4]
    assert jump._flagged_everywhere(groupdq, np.arange(nrows) != 4)[3, 4]

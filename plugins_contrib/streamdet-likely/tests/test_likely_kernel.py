"""The LIKELY kernel against stcal 1.20's own functions, called directly on the same
ramps (stcal is jwst's, a test-only dependency), plus properties of the estimator."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, PIXEL, SATURATED
from streamdet_likely.kernel import (
    JUMP_CHISQ_THRESHOLD,
    combine_integrations,
    find_jumps,
    fit_likely,
    gls_sums,
)

likely_fit = pytest.importorskip("stcal.ramp_fitting.likely_fit")
from stcal.ramp_fitting.likely_algo_classes import Covar  # noqa: E402
from stcal.ramp_fitting.ramp_fit_class import RampData  # noqa: E402

DT = 2.775  # MIRI full-frame group time (s)
SQRT2 = np.sqrt(2.0)


def _covar(ngroups, dt=DT):
    return Covar([np.array([(k + 1) * dt]) for k in range(ngroups)])


def _covariance(rate, rn, gain, dt=DT):
    """Our parametrisation of the difference covariance (DN/s units)."""
    read_var = rn * rn / (dt * dt)
    return rate / (gain * dt) + read_var, -0.5 * read_var


def _rows(n, m, seed):
    """Differences (DN/s) of m ramps with every kind of mask stcal's search meets:
    long clean runs, sparse masks down to 0-3 used differences (two side by side or
    apart), single-difference jumps and two-difference excursions."""
    rng = np.random.default_rng(seed)
    rate = rng.choice([0.0, 3.0, 30.0, 300.0, 3000.0], m) * rng.uniform(0.5, 1.5, m)
    gain = rng.uniform(3.0, 6.0, m)
    rn = rng.uniform(5.0, 40.0, m)  # CDS, DN
    photon = rng.poisson(np.maximum(rate, 0) * DT * gain, (n + 1, m)) / gain
    reads = np.cumsum(photon, axis=0) + rng.normal(0, 1, (n + 1, m)) * rn / SQRT2
    d = np.diff(reads, axis=0) / DT
    hit = rng.random(m) < 0.4
    where = rng.integers(0, n, m)
    d[where[hit], np.flatnonzero(hit)] += rng.choice([-1, 1], hit.sum()) * rng.uniform(
        2.0, 40.0, hit.sum()) * rn[hit] / DT
    two = rng.random(m) < 0.1
    k2 = rng.integers(0, n - 1, m)
    d[k2[two], np.flatnonzero(two)] += 25 * rn[two] / DT
    d[k2[two] + 1, np.flatnonzero(two)] -= 12 * rn[two] / DT
    use = np.ones((n, m), bool)
    kind = rng.integers(0, 6, m)
    use[:, kind == 1] = rng.random((n, (kind == 1).sum())) > 0.3
    for i in np.flatnonzero(kind == 2):  # only a handful used
        use[:, i] = False
        use[rng.choice(n, rng.integers(0, 4), replace=False), i] = True
    for i in np.flatnonzero(kind == 3):  # exactly two, side by side
        use[:, i] = False
        k = rng.integers(0, n - 1)
        use[k:k + 2, i] = True
    return d, use, rate, gain, rn


def _single_run(use):
    """Per column: the length of its used differences when they form one run, else -1."""
    count = use.sum(axis=0)
    starts = (use[0].astype(int) + (use[1:] & ~use[:-1]).sum(axis=0))
    return np.where(starts == 1, count, -1)


@pytest.mark.parity
@pytest.mark.parametrize("n, seed", [(11, 1), (4, 2), (29, 3), (6, 4)])
def test_jump_search_matches_stcal_mask_jumps(n, seed):
    m = 3000
    d, use, _, gain, rn = _rows(n, m, seed)
    theirs_use, theirs_rate = likely_fit.mask_jumps(
        d.copy(), _covar(n + 1), rn / SQRT2, gain, diffs2use=use.astype(np.uint8))
    median = np.median(d, axis=0)
    median *= median > 0
    diag, off = _covariance(median, rn, gain)
    ours_use = use.copy()
    ours_rate, jumps = find_jumps(d, ours_use, diag, off)
    theirs_use = theirs_use.astype(bool)
    np.testing.assert_array_equal(jumps, use & ~ours_use)
    # two used differences: a tie that stcal's rounding decides (see find_jumps); which
    # one is dropped may differ. Apart, the decision to drop is the same; side by side
    # stcal's rounding also skips some drops (its omission of both is then undefined)
    tie = use.sum(axis=0) == 2
    # stcal's closed form for omitting two neighbours is 0/0 for a zero-rate covariance
    # on one run of 4 or 6 differences (before or after a drop): rounding then makes it
    # NaN, which ends the search early, or not
    zero_rate = (median == 0) & ~tie
    same = ~tie & ~zero_rate
    np.testing.assert_array_equal(ours_use[:, same], theirs_use[:, same])
    np.testing.assert_allclose(ours_rate[same], theirs_rate[same], rtol=1e-9, atol=1e-9)
    assert not (ours_use & ~theirs_use)[:, zero_rate].any()  # stcal only stops earlier
    agree = (ours_use == theirs_use).all(axis=0)
    assert agree[zero_rate & (_single_run(use) != 4) & (_single_run(use) != 6)].mean() > 0.97
    assert agree[zero_rate].mean() > 0.8
    apart = tie & ~(use[:-1] & use[1:]).any(axis=0)
    ours_drop, theirs_drop = ours_use.sum(axis=0) < 2, theirs_use.sum(axis=0) < 2
    np.testing.assert_array_equal(ours_drop[apart], theirs_drop[apart])
    assert not (theirs_drop & tie & ~ours_drop).any()
    assert jumps.any(axis=0).sum() > 0.2 * m  # the search really was exercised
    assert (tie & jumps.any(axis=0)).sum() > 5


@pytest.mark.parity
def test_fit_matches_stcal_fit_ramps():
    n, m = 17, 4000
    d, use, rate, gain, rn = _rows(n, m, 7)
    guess = np.where(rate > 0, rate, 0.0) * 1.1 + 0.3
    theirs = likely_fit.fit_ramps(d, _covar(n + 1), gain, rn / SQRT2, count_rate_guess=guess,
                                  diffs2use=use.astype(np.uint8))
    diag, off = _covariance(guess, rn, gain)
    S, N, Q2, Q11 = gls_sums(d, use, diag, off)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = 1 / S ** 2
        ours = {"countrate": N / S, "uncert": np.sqrt(1 / S),
                "var_poisson": guess / (gain * DT) * Q2 * scale,
                "var_rnoise": rn ** 2 / DT ** 2 * (Q2 - Q11) * scale}
    fitted = use.any(axis=0)
    for key, value in ours.items():
        np.testing.assert_allclose(value[fitted], getattr(theirs, key)[fitted], rtol=1e-9,
                                   err_msg=key)


def test_solver_matches_a_dense_inverse():
    rng = np.random.default_rng(3)
    n, m = 9, 50
    d = rng.normal(10, 3, (n, m))
    use = rng.random((n, m)) > 0.3
    diag = rng.uniform(2.0, 5.0, m)
    off = -rng.uniform(0.0, 1.0, m)
    S, N, Q2, Q11 = gls_sums(d, use, diag, off)
    for j in range(m):
        idx = np.flatnonzero(use[:, j])
        cov = np.diag(np.full(n, diag[j])) + off[j] * (np.eye(n, k=1) + np.eye(n, k=-1))
        inv = np.zeros((n, n))
        if idx.size:
            inv[np.ix_(idx, idx)] = np.linalg.inv(cov[np.ix_(idx, idx)])
        q = inv @ np.ones(n)
        np.testing.assert_allclose([S[j], N[j], Q2[j], Q11[j]],
                                   [q.sum(), q @ np.where(use[:, j], d[:, j], 0), q @ q,
                                    q[:-1] @ q[1:]], rtol=1e-12, atol=1e-14)


def _ramps(nints, ngroups, ny, nx, seed):
    """A band of MIRI-like ramps with the flags jwst's earlier steps leave.

    Free of the cases where stcal's own choice follows its rounding (see find_jumps):
    every ramp keeps at least 3 usable differences and a positive median rate."""
    rng = np.random.default_rng(seed)
    rate = rng.choice([20.0, 300.0, 4000.0], (ny, nx)) * rng.uniform(0.8, 1.2, (ny, nx))
    gain = np.full((ny, nx), 5.5, np.float32)
    rn = rng.uniform(20.0, 35.0, (ny, nx)).astype(np.float32)
    counts = rng.poisson(rate * DT * gain, (nints, ngroups, ny, nx)) / gain
    data = 10000 + np.cumsum(counts, axis=1) + rng.normal(0, 1, counts.shape) * rn / SQRT2
    gdq = np.zeros(data.shape, np.uint8)
    gdq[:, -1] = DO_NOT_USE                       # lastframe
    cr = rng.random((nints, ny, nx)) < 0.15       # cosmic rays, some flagged by "jump"
    at = rng.integers(1, ngroups, (nints, ny, nx))
    later = np.arange(ngroups)[None, :, None, None] >= at[:, None]
    data += 400.0 * (cr[:, None] & later)
    flagged = cr & (rng.random(cr.shape) < 0.5)
    ii, yy, xx = np.nonzero(flagged)
    gdq[ii, at[flagged], yy, xx] |= JUMP_DET
    sat = rng.random((ny, nx)) < 0.05             # saturating from some group on
    start = rng.integers(5, ngroups + 1, (ny, nx))
    s_mask = sat[None, None] & (np.arange(ngroups)[None, :, None, None] >= start[None, None])
    gdq[np.broadcast_to(s_mask, gdq.shape)] |= SATURATED | DO_NOT_USE
    gdq[:, :, 0, 0] = DO_NOT_USE                  # a dead pixel
    gdq[0, :, 0, 1] = DO_NOT_USE                  # unusable in one integration only
    gdq[:, 1:, 0, 2] = SATURATED | DO_NOT_USE     # one usable group: no difference
    gdq[:, 3, 1, 0] |= PIXEL["PERSISTENCE"]       # any flag removes a group
    pdq = np.zeros((ny, nx), np.uint32)
    pdq[0, 0] = DO_NOT_USE | PIXEL["DEAD"]
    pdq[1, 1] = PIXEL["HOT"]
    dark = rng.uniform(0.0, 0.5, (ny, nx)).astype(np.float32)
    return data.astype(np.float32), gdq, pdq, rn, gain, dark


@pytest.mark.parity
@pytest.mark.parametrize("nints, ngroups", [(1, 10), (3, 12), (2, 6)])
def test_fit_likely_matches_stcal_likely_ramp_fit(nints, ngroups):
    from stdatamodels.jwst.datamodels import dqflags

    data, gdq, pdq, rn, gain, dark = _ramps(nints, ngroups, 12, 40, seed=nints + ngroups)
    ramp = RampData()
    ramp.set_arrays(data.copy(), gdq.copy(), pdq.copy(), dark.copy())
    ramp.set_meta(name="MIRI", frame_time=DT, group_time=DT, groupgap=0, nframes=1)
    ramp.set_dqflags(dqflags.pixel)
    image, integ, _ = likely_fit.likely_ramp_fit(ramp, rn.copy(), gain.copy())
    rate, ints = fit_likely(data, gdq, pdq, readnoise=rn, gain=gain, group_time=DT,
                            average_dark_current=dark)
    for ours, theirs in ((rate, image), (ints, integ)):
        for mine, key in ((ours.sci, "slope"), (ours.err, "err"),
                          (ours.var_poisson, "var_poisson"), (ours.var_rnoise, "var_rnoise")):
            np.testing.assert_allclose(mine, theirs[key], rtol=2e-6, equal_nan=True, err_msg=key)
        np.testing.assert_array_equal(ours.dq, theirs["dq"])
    # stcal's own search flagged jumps the "jump step" had missed: they are in the DQ
    assert ((ints.dq & JUMP_DET) != 0).sum() > ((gdq & JUMP_DET) != 0).any(axis=1).sum()


@pytest.mark.parity
def test_rate_combination_matches_stcal_compute_image_info():
    rng = np.random.default_rng(5)
    nints, npix = 5, 2000
    sci = rng.normal(50, 10, (nints, npix)).astype(np.float32)
    vp = rng.uniform(0.1, 2.0, (nints, npix)).astype(np.float32)
    vr = rng.uniform(0.1, 2.0, (nints, npix)).astype(np.float32)
    sci[:, :20] = -5  # negative rates: no Poisson rescaling
    for arr in (sci, vp, vr):
        arr[1, 30:40] = np.nan
        arr[:, 50] = np.nan
    dq = rng.choice(np.array([0, 2, 4, 1], np.uint32), (nints, npix), p=[0.7, 0.1, 0.1, 0.1])
    dq[:, 50] = DO_NOT_USE

    integ = SimpleNamespace(data=sci[:, None], var_poisson=vp[:, None], var_rnoise=vr[:, None],
                            dq=dq[:, None], chisq=np.zeros_like(sci[:, None]))
    ramp = RampData()
    ramp.flags_do_not_use = DO_NOT_USE
    theirs = {k: v[0] for k, v in likely_fit.compute_image_info(integ, ramp).items()}
    from streamdet.core.products import RateArrays

    ours = combine_integrations(RateArrays(sci, np.sqrt(vp + vr), dq, vp, vr))
    for mine, key in ((ours.sci, "slope"), (ours.err, "err"), (ours.var_poisson, "var_poisson"),
                      (ours.var_rnoise, "var_rnoise")):
        np.testing.assert_allclose(mine, theirs[key], rtol=1e-6, equal_nan=True, err_msg=key)
    np.testing.assert_array_equal(ours.dq, theirs["dq"])


def test_noiseless_ramps_give_their_rate_and_no_jumps():
    rates = np.array([0.0, 1.0, 40.0, 2000.0])
    t = (np.arange(8) + 1.0) * DT
    data = (1000 + t[None, :, None, None] * rates).astype(np.float32)
    data = np.broadcast_to(data, (2, 8, 1, 4)).copy()
    gdq = np.zeros(data.shape, np.uint8)
    rate, ints = fit_likely(data, gdq, np.zeros((1, 4), np.uint32),
                            readnoise=np.full((1, 4), 30.0, np.float32),
                            gain=np.full((1, 4), 5.5, np.float32), group_time=DT)
    np.testing.assert_allclose(rate.sci[0], rates, rtol=1e-5, atol=1e-4)
    assert (rate.dq == 0).all() and (ints.dq == 0).all()
    # zero rate: the read-noise variance of a straight-line fit to 8 reads of variance
    # rn^2 / 2, 12 s^2 / (dt^2 (n^3 - n))
    expected = 12 * 30.0 ** 2 / 2 / (DT ** 2 * (8 ** 3 - 8))
    np.testing.assert_allclose(ints.var_rnoise[:, 0, 0], expected, rtol=1e-5)
    assert ints.var_poisson[0, 0, 0] == 0


def test_a_big_unflagged_jump_is_found_flagged_and_left_out():
    t = (np.arange(10) + 1.0) * DT
    data = (1000 + 10.0 * t)[None, :, None, None].repeat(2, axis=3).astype(np.float32)
    data[0, 6:, 0, 1] += 500.0  # cosmic ray in group 6 of pixel 1
    gdq = np.zeros(data.shape, np.uint8)
    rate, ints = fit_likely(data, gdq, np.zeros((1, 2), np.uint32),
                            readnoise=np.full((1, 2), 20.0, np.float32),
                            gain=np.full((1, 2), 5.5, np.float32), group_time=DT)
    assert ints.dq[0, 0].tolist() == [0, JUMP_DET]
    np.testing.assert_allclose(ints.sci[0, 0], 10.0, rtol=1e-5)
    used = np.ones((9, 2), bool)
    diag, off = _covariance(np.full(2, 10.0), np.full(2, 20.0), np.full(2, 5.5))
    d = np.diff(data[0, :, 0].astype(np.float64), axis=0) / DT
    _, jumps = find_jumps(d, used, diag, off, JUMP_CHISQ_THRESHOLD)
    assert np.flatnonzero(jumps[:, 1]).tolist() == [5]  # the difference ending on group 6


def test_pixel_chunks_do_not_change_results():
    data, gdq, pdq, rn, gain, dark = _ramps(2, 9, 6, 50, seed=9)
    kw = dict(readnoise=rn, gain=gain, group_time=DT, average_dark_current=dark)
    whole = fit_likely(data, gdq, pdq, **kw)
    pieces = fit_likely(data, gdq, pdq, chunk_elements=64 * 2 * 8, **kw)
    for a, b in zip(whole, pieces):
        for x, y in zip(a.arrays(), b.arrays()):
            np.testing.assert_array_equal(x, y)

"""The likelihood ramp-fitting kernel on synthetic arrays (no files)."""

from __future__ import annotations

import numpy as np
import pytest

from streamdet.core.dqflags import DO_NOT_USE, JUMP_DET, NO_GAIN_VALUE, SATURATED
from streamdet_likely.kernel import fit_likely, solve_weights, used_differences

DT = 0.25  # group time: rates that are multiples of 4 DN/s give integer ramps


def _fit(data, groupdq=None, pixeldq=None, rn=6.0, gain=5.5, dt=DT, **kw):
    data = np.asarray(data, dtype=np.float32)
    nints, ngroups, ny, nx = data.shape
    if groupdq is None:
        groupdq = np.zeros(data.shape, np.uint8)
    if pixeldq is None:
        pixeldq = np.zeros((ny, nx), np.uint32)
    return fit_likely(data, groupdq, pixeldq,
                      readnoise=np.broadcast_to(np.float32(rn), (ny, nx)),
                      gain=np.broadcast_to(np.float32(gain), (ny, nx)), group_time=dt, **kw)


def _linear(rates, ngroups, nints=1, pedestal=1000.0, dt=DT):
    """Noiseless ramps [nints, ngroups, 1, npix] of the given rates (DN/s)."""
    rates = np.asarray(rates, dtype=np.float64)
    t = (np.arange(ngroups) + 1.0) * dt
    ramp = pedestal + t[:, None] * rates[None, :]
    return np.broadcast_to(ramp, (nints, ngroups, rates.size))[:, :, None, :].copy()


def _dense_gls(d, use, read_var, poisson_var):
    """Reference: the GLS solve with an explicit covariance matrix."""
    n = d.size
    idx = np.flatnonzero(use)
    cov = (np.diag(np.full(n, 2 * read_var + poisson_var))
           - read_var * (np.eye(n, k=1) + np.eye(n, k=-1)))
    sub = cov[np.ix_(idx, idx)]
    z = np.linalg.solve(sub, np.ones(idx.size))
    w = np.zeros(n)
    w[idx] = z / z.sum()
    return z.sum(), w @ d, w


def test_solver_matches_dense_generalised_least_squares():
    rng = np.random.default_rng(11)
    n, m = 15, 300
    d = rng.normal(4.0, 3.0, (n, m))
    use = rng.random((n, m)) > 0.25
    use[:, 0] = True
    use[::2, 1] = False  # isolated differences only
    read_var = rng.uniform(0.5, 30.0, m)
    poisson_var = rng.uniform(0.0, 80.0, m)
    poisson_var[:10] = 0.0
    sums = solve_weights(d, use, read_var, poisson_var)
    for j in range(m):
        if not use[:, j].any():
            assert sums.S[j] == 0 and sums.N[j] == 0
            continue
        S, mean, w = _dense_gls(d[:, j], use[:, j], read_var[j], poisson_var[j])
        assert sums.S[j] == pytest.approx(S, rel=1e-12)
        assert sums.N[j] / sums.S[j] == pytest.approx(mean, rel=1e-12, abs=1e-12)
        var_r = read_var[j] * (2 * np.sum(w * w) - 2 * np.sum(w[:-1] * w[1:]))
        var_p = poisson_var[j] * np.sum(w * w)
        got_r = read_var[j] * (2 * sums.Q2[j] - 2 * sums.Q11[j]) / sums.S[j] ** 2
        got_p = poisson_var[j] * sums.Q2[j] / sums.S[j] ** 2
        assert got_r == pytest.approx(var_r, rel=1e-10)
        assert got_p == pytest.approx(var_p, rel=1e-10, abs=1e-300)
        # the two parts add up to the GLS variance 1 / S
        assert got_r + got_p == pytest.approx(1.0 / S, rel=1e-10)


@pytest.mark.parametrize("rn", [6.0, 0.0])
def test_noiseless_ramp_gives_the_exact_slope(rn):
    rates = np.array([0.0, 4.0, 20.0, 400.0, 8000.0, -8.0])
    data = _linear(rates, ngroups=12, nints=2)
    rate, rateints = _fit(data, rn=rn)
    np.testing.assert_allclose(rate.sci[0], rates, rtol=2e-7, atol=1e-6)
    np.testing.assert_allclose(rateints.sci[:, 0], np.broadcast_to(rates, (2, rates.size)),
                               rtol=2e-7, atol=1e-6)
    assert np.all(rate.dq == 0) and np.all(rateints.dq == 0)


def test_read_noise_variance_of_a_zero_rate_ramp():
    """Pure read noise: the GLS is the straight-line fit, var = 12 s2 / (dt^2 (n^3 - n))."""
    n, rn = 10, 6.0
    rate, rateints = _fit(_linear([0.0], ngroups=n), rn=rn)
    expected = 12 * (rn * rn / 2) / (DT * DT * (n ** 3 - n))
    assert rateints.var_rnoise[0, 0, 0] == pytest.approx(expected, rel=1e-6)
    assert rateints.var_poisson[0, 0, 0] == 0
    assert rate.err[0, 0] == pytest.approx(np.sqrt(expected), rel=1e-6)


@pytest.mark.parametrize("jump_mask", ["read", "difference"])
def test_jump_flag_splits_the_ramp(jump_mask):
    rates = np.array([40.0, 40.0, 400.0])
    data = _linear(rates, ngroups=10)
    data[0, 6:, 0, :] += 500.0  # a cosmic ray between groups 5 and 6
    gdq = np.zeros(data.shape, np.uint8)
    gdq[0, 6, 0, :2] = JUMP_DET  # flagged in pixels 0 and 1, not in pixel 2
    gdq[0, 6, 0, 1] |= 32  # PERSISTENCE does not make a group unusable
    rate, rateints = _fit(data, gdq, jump_mask=jump_mask)
    np.testing.assert_allclose(rate.sci[0, :2], rates[:2], rtol=2e-7)
    assert rate.sci[0, 2] > rates[2] + 100  # the unflagged jump leaks into the slope
    assert rate.dq[0, 0] == JUMP_DET and rate.dq[0, 1] == JUMP_DET | 32
    assert rateints.dq[0, 0, 0] == JUMP_DET
    use = used_differences(gdq[0, :, 0, :], jump_mask)
    assert not use[5, 0] and use[4, 0]  # the difference holding the jump is out
    assert use[6, 0] == (jump_mask == "difference")  # the one after: only by choice
    assert use[:, 2].all()


def test_dropping_the_flagged_read_removes_a_single_read_excursion():
    """A noise spike in one read, flagged by the jump step as if it were a jump."""
    rates = np.array([40.0])
    data = _linear(rates, ngroups=12)
    data[0, 6] += 60.0
    gdq = np.zeros(data.shape, np.uint8)
    gdq[0, 6] = JUMP_DET
    by_read, _ = _fit(data, gdq, jump_mask="read")
    by_difference, _ = _fit(data, gdq, jump_mask="difference")
    np.testing.assert_allclose(by_read.sci[0], rates, rtol=2e-7)
    assert by_difference.sci[0, 0] < rates[0] - 1.0  # y7 - y6 is 60 DN short


def test_bad_and_saturated_groups_are_left_out():
    rates = np.array([80.0, 80.0, 80.0])
    data = _linear(rates, ngroups=12)
    gdq = np.zeros(data.shape, np.uint8)
    data[0, 4, 0, 0] = -3e4
    gdq[0, 4, 0, 0] = DO_NOT_USE  # one bad group in the middle
    data[0, 8:, 0, 1] = data[0, 8, 0, 1]
    gdq[0, 8:, 0, 1] = SATURATED  # saturated tail
    data[0, 3, 0, 2] = np.nan  # a NaN sample is simply not used
    rate, rateints = _fit(data, gdq)
    np.testing.assert_allclose(rate.sci[0], rates, rtol=2e-7)
    assert rate.dq[0, 0] == 0
    assert rate.dq[0, 1] == SATURATED and rateints.dq[0, 0, 1] == SATURATED


def test_dq_semantics_follow_the_builtin_fit():
    data = _linear([40.0] * 5, ngroups=8, nints=2)
    gdq = np.zeros(data.shape, np.uint8)
    pdq = np.zeros((1, 5), np.uint32)
    pdq[0, 0] = DO_NOT_USE | (1 << 10)  # dead: no rate at all
    gdq[0, :, 0, 2] = SATURATED  # integration 1 saturated from the start
    gdq[:, :, 0, 3] = SATURATED  # both integrations saturated
    gdq[0, 1:, 0, 4] = DO_NOT_USE  # a single usable group: no difference
    gain = np.full((1, 5), 5.5, np.float32)
    gain[0, 1] = 0.0
    rate, rateints = fit_likely(data.astype(np.float32), gdq, pdq,
                                readnoise=np.full((1, 5), 6.0, np.float32), gain=gain,
                                group_time=DT)
    sci, dq = rate.sci[0], rate.dq[0]
    assert np.isnan(sci[0]) and dq[0] == DO_NOT_USE | (1 << 10)
    assert np.isnan(sci[1]) and dq[1] == DO_NOT_USE | NO_GAIN_VALUE
    assert sci[2] == pytest.approx(40.0) and dq[2] == SATURATED
    assert np.isnan(rateints.sci[0, 0, 2]) and rateints.dq[0, 0, 2] == DO_NOT_USE | SATURATED
    assert rateints.dq[1, 0, 2] == 0 and rateints.sci[1, 0, 2] == pytest.approx(40.0)
    assert np.isnan(sci[3]) and dq[3] == DO_NOT_USE | SATURATED
    assert sci[4] == pytest.approx(40.0) and dq[4] == 0
    assert np.isnan(rateints.sci[0, 0, 4]) and rateints.dq[0, 0, 4] == DO_NOT_USE
    for arrays in (rate, rateints):
        bad = np.isnan(arrays.sci)
        for name in ("err", "var_poisson", "var_rnoise"):
            assert np.all(getattr(arrays, name)[bad] == 0)
        assert np.all(np.isfinite(arrays.err))


def _noisy(rate, ngroups, nints, npix, rn=6.0, gain=5.5, dt=0.3, seed=0):
    """Ramps with Poisson charge and read noise, as the simulator makes them."""
    rng = np.random.default_rng(seed)
    charge = np.cumsum(rng.poisson(rate * dt * gain, (nints, ngroups, npix)) / gain, axis=1)
    reads = charge + rng.normal(0.0, rn / np.sqrt(2.0), charge.shape) + 12000.0
    return reads[:, :, None, :].astype(np.float32)


@pytest.mark.parametrize("true_rate", [2.0, 50.0, 2000.0])
def test_unbiased_with_calibrated_errors_and_no_worse_than_plain_least_squares(true_rate):
    npix, ngroups, nints, dt = 20000, 25, 2, 0.3
    data = _noisy(true_rate, ngroups, nints, npix, dt=dt, seed=int(true_rate))
    rate, _ = _fit(data, dt=dt)
    sci, err = rate.sci[0].astype(np.float64), rate.err[0].astype(np.float64)
    assert np.all(np.isfinite(sci))
    typical = np.median(err)
    assert abs(np.mean(sci - true_rate)) < 0.03 * typical  # ~4 standard errors
    assert 0.97 < np.std(sci - true_rate) / typical < 1.03
    pulls = (sci - true_rate) / err
    assert 0.97 < np.std(pulls) < 1.03
    # unweighted straight-line fit per integration, averaged
    t = np.arange(ngroups) * dt
    reads = data[:, :, 0, :].astype(np.float64)
    tc = t - t.mean()
    ols = (np.einsum("g,igp->ip", tc, reads) / np.sum(tc * tc)).mean(axis=0)
    assert np.std(sci - true_rate) <= np.std(ols - true_rate) * 1.001


def test_results_do_not_depend_on_the_pixel_chunking():
    rng = np.random.default_rng(5)
    data = _noisy(30.0, 15, 3, 4000, seed=3).reshape(3, 15, 40, 100)
    slopes = rng.uniform(0, 500, (40, 100)).astype(np.float32)  # a spread of rates
    data += slopes * np.arange(15, dtype=np.float32)[None, :, None, None] * np.float32(0.3)
    gdq = np.zeros(data.shape, np.uint8)
    gdq[rng.random(data.shape) < 0.03] = JUMP_DET
    gdq[rng.random(data.shape) < 0.02] |= DO_NOT_USE
    gdq[:, 0] = DO_NOT_USE
    a = _fit(data, gdq, dt=0.3)
    b = _fit(data, gdq, dt=0.3, chunk_elements=1000)
    for one, other in zip(a, b):
        for x, y in zip(one.arrays(), other.arrays()):
            np.testing.assert_array_equal(x, y)


def test_rejects_what_it_cannot_fit():
    with pytest.raises(ValueError, match="at least 2 groups"):
        _fit(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match="iterations"):
        _fit(np.zeros((1, 4, 2, 2)), iterations=0)
    with pytest.raises(ValueError, match="jump_mask"):
        _fit(np.zeros((1, 4, 2, 2)), jump_mask="group")

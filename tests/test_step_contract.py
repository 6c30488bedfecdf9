"""The step contract of core/step.py as the engine keeps it: the whole-exposure pre-pass,
the rate producer's typed result and the typed exposure state, on simulated exposures."""

from __future__ import annotations

import numpy as np
import pytest

from streamdet.core.errors import PluginError
from streamdet.core.exposure import Exposure
from streamdet.core.step import ExposureState, Step
from streamdet.plugins.ramp_fit import RampFitStep

from .test_plugins import plugin


class _Prepass(Step):
    """Inserted before saturation: keeps what its pre-pass read, and notes whether a
    chunk ever came before it."""

    name = "prepass_probe"
    implementation = "probe"
    before = "saturation"
    prepass_exposure = True
    seen: list = []
    events: list = []

    def prepass(self, ramp):
        type(self).events.append("prepass")
        for i in range(ramp.nints):
            data, groupdq = ramp.read(i)
            data += 1.0  # the arrays are the step's own: this must not reach the ramp
            type(self).seen.append((i, data - 1.0, groupdq.copy()))

    def process(self, chunk):
        type(self).events.append("process")


@pytest.fixture
def probe():
    _Prepass.seen, _Prepass.events = [], []
    return _Prepass


def test_prepass_sees_every_input_integration_once_before_any_chunk(streamdet_sim, streamdet_run,
                                                                   probe):
    sim = streamdet_sim(subarray="SUB64", ngroups=5, nints=3, seed=11)
    result = streamdet_run(sim, plugins=[plugin(probe)])
    assert probe.events[0] == "prepass" and probe.events.count("prepass") == 1
    assert probe.events.count("process") >= 3  # every integration, after the pre-pass
    with Exposure(sim.uncal) as exposure:
        data, groupdq = exposure.read(slice(None))
    assert [i for i, *_ in probe.seen] == [0, 1, 2]
    for i, seen_data, seen_dq in probe.seen:
        assert seen_data.shape == data.shape[1:] and seen_data.dtype == np.float32
        np.testing.assert_array_equal(seen_data, data[i])
        np.testing.assert_array_equal(seen_dq, groupdq[i])
    # the probe's own modification of its copies changed no product
    plain = streamdet_run(sim)
    from astropy.io import fits
    np.testing.assert_array_equal(fits.getdata(result.products["rate"], "SCI"),
                                  fits.getdata(plain.products["rate"], "SCI"))


def test_a_skipped_step_has_no_prepass(streamdet_sim, streamdet_run, probe):
    sim = streamdet_sim(subarray="SUB64", ngroups=5, nints=2, seed=11)
    streamdet_run(sim, plugins=[plugin(probe)], steps={"prepass_probe": {"skip": True}})
    assert probe.events == []


class _PairFit(RampFitStep):
    """A rate producer that returns the old untyped pair instead of a RateResult."""

    implementation = "pair"

    def process(self, chunk):
        result = super().process(chunk)
        return result.rate, result.rateints


def test_a_rate_producer_must_return_a_rate_result(streamdet_sim, streamdet_run):
    sim = streamdet_sim(subarray="SUB64", ngroups=5, nints=2, seed=11)
    with pytest.raises(PluginError, match=r"ramp_fit \(pair, .*returned tuple, not a RateResult"):
        streamdet_run(sim, plugins=[plugin(_PairFit)], use={"ramp_fit": "pair"})


def test_exposure_state_carries_named_values_only(streamdet_sim, streamdet_run):
    sim = streamdet_sim(subarray="SUB64", ngroups=5, nints=2, seed=11)
    result = streamdet_run(sim)
    ramp_fit = next(s for s in result.chain if s.name == "ramp_fit")
    state = ramp_fit.meta.state
    assert isinstance(state, ExposureState)
    # dark_current's value reached the rate producer, one per pixel
    assert state.average_dark_current.shape == (ramp_fit.meta.ny, ramp_fit.meta.nx)
    assert np.isfinite(state.average_dark_current).all()
    with pytest.raises(AttributeError):
        state.average_dark_curent = 1.0  # a misspelt key is refused, not a new entry


def test_the_old_produces_rate_flag_is_reported_not_silently_ignored():
    """A rate producer written before RateProducer (a Step with ``produces_rate = True``)
    would otherwise be taken for an ordinary step, and the chain would end without one."""
    from streamdet.core.plugins import build_registry
    from streamdet.core.step import Granularity

    class OldFit(Step):
        name = "ramp_fit"
        implementation = "old"
        produces_rate = True
        granularity = Granularity.EXPOSURE

    registry = build_registry((plugin(OldFit, name="oldpkg"),), only_builtin=True)
    text = "\n".join(registry.broken)
    assert "oldpkg" in text and "subclasses streamdet.core.step.RateProducer" in text
    assert "old" not in {cls.implementation for cls in registry.implementations["ramp_fit"]}

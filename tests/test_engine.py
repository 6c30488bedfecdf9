"""The engine: results independent of chunking, memory flat in the number of
integrations, products that jwst's datamodels accept, segmented files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from astropy.io import fits

from streamdet.core.engine import RunConfig, process_file
from streamdet.simulate import simulate
from streamdet.testing import crds_environment, metadata_tree_text

from .oracle import assert_parity, run_jwst_detector1, run_python

IGNORED_CARDS = {"DATE", "FILENAME"}


def assert_identical_products(a, b):
    with fits.open(a) as ha, fits.open(b) as hb:
        assert [h.name for h in ha] == [h.name for h in hb]
        for x, y in zip(ha, hb):
            if x.name == "ASDF":
                assert metadata_tree_text(x) == metadata_tree_text(y)
            elif x.data is not None:
                if isinstance(x, fits.BinTableHDU):
                    assert x.data.tobytes() == y.data.tobytes(), x.name
                else:
                    assert np.array_equal(x.data, y.data, equal_nan=True), x.name
            cards_x = {k: v for k, v in x.header.items() if k not in IGNORED_CARDS}
            cards_y = {k: v for k, v in y.header.items() if k not in IGNORED_CARDS}
            assert cards_x == cards_y, x.name


@pytest.fixture(scope="module")
def sim_sub256(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"), subarray="SUB256", ngroups=20, nints=3, seed=21)


def test_results_do_not_depend_on_chunking(sim_sub256, tmp_path):
    """Tiny bands (a few rows, halo rows at every edge) and rateints kept in scratch files
    give bit-identical products to one band with rateints in memory."""
    with crds_environment(sim_sub256):
        whole = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path / "whole",
                                                         band_bytes=1 << 30))
        banded = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path / "banded",
                                                          band_bytes=150_000,
                                                          rateints_in_memory_bytes=0))
    for kind in ("rate", "rateints"):
        assert_identical_products(whole.products[kind], banded.products[kind])
    with fits.open(banded.products["rate"]) as hdul:
        assert np.count_nonzero(hdul["DQ"].data & 4) > 50   # jumps were found across band edges


MEMORY_PROBE = """
import json, resource, tracemalloc, os
from streamdet.core.engine import RunConfig, process_file
tracemalloc.start()
process_file({uncal!r}, RunConfig(output_dir={out!r}, band_bytes=2_000_000, rateints_in_memory_bytes=0,
                                  hooks={hooks!r}))
peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({{"traced_peak": peak, "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


@pytest.mark.parametrize("hooks", [[], [("post", "jump", "snowblind.SnowblindStep")]],
                         ids=["builtin", "stpipe_hook_after_jump"])
def test_peak_memory_does_not_grow_with_integrations(tmp_path, hooks):
    """2 and 20 integrations of the same frame: Python-heap peak (tracemalloc, numpy
    arrays included) within 20 %, and the process's peak RSS as well. Also with an
    stpipe step hooked after jump, which is handed one whole integration at a time (an
    integration pass after the band pass)."""
    if hooks:
        pytest.importorskip("snowblind")
    peaks = {}
    for nints in (2, 20):
        sim = simulate(tmp_path / f"sim{nints}", subarray="SUB256", ngroups=10, nints=nints, seed=5)
        code = MEMORY_PROBE.format(uncal=str(sim.uncal), out=str(tmp_path / f"out{nints}"),
                                   hooks=hooks)
        from .oracle import last_json
        peaks[nints] = last_json(run_python(code, sim.env))
    small, large = peaks[2], peaks[20]
    print(json.dumps(peaks))
    assert large["traced_peak"] <= 1.2 * small["traced_peak"], peaks
    assert large["max_rss"] <= 1.2 * small["max_rss"], peaks


VALIDATE = """
import json, warnings
warnings.simplefilter("error")
from jwst import datamodels
out = {{}}
for kind in ("rate", "rateints"):
    with datamodels.open({paths!r}[kind]) as model:
        model.validate()
        out[kind] = [type(model).__name__, list(model.data.shape), model.meta.cal_step.jump,
                     model.meta.cal_step.refpix, model.meta.ref_file.dark.name,
                     model.meta.ref_file.crds.context_used, model.meta.bunit_data]
print(json.dumps(out))
"""


def test_products_open_and_validate_as_jwst_models(sim_sub256, tmp_path):
    with crds_environment(sim_sub256):
        result = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path))
    from .oracle import last_json
    paths = {k: str(v) for k, v in result.products.items()}
    seen = last_json(run_python(VALIDATE.format(paths=paths), sim_sub256.env))
    assert seen["rate"][:2] == ["ImageModel", [256, 256]]
    assert seen["rateints"][:2] == ["CubeModel", [3, 256, 256]]
    assert seen["rate"][2:5] == ["COMPLETE", "SKIPPED", f"crds://{sim_sub256.refs['dark'].name}"]
    assert seen["rate"][5] == sim_sub256.context and seen["rate"][6] == "DN/s"
    with fits.open(result.products["rateints"]) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "ERR", "DQ", "INT_TIMES",
                                          "VAR_POISSON", "VAR_RNOISE", "ASDF"]
        history = [str(h) for h in hdul[0].header["HISTORY"]]
        assert "streamdet: ramp_fit=builtin (streamdet 0.1.0)" in history
        assert hdul[0].header["S_IPC"] == "SKIPPED" and hdul[0].header["S_RSCD"] == "COMPLETE"


def _segment(uncal, out, first: int, last: int):
    """A DMS-style segment of ``uncal`` holding integrations first..last (1-based)."""
    with fits.open(uncal) as hdul:
        hdul["SCI"].data = hdul["SCI"].data[first - 1:last]
        hdul[0].header["INTSTART"] = first
        hdul[0].header["INTEND"] = last
        if "INT_TIMES" in hdul:
            rows = hdul["INT_TIMES"].data
            hdul["INT_TIMES"].data = rows[(rows["integration_number"] >= first)
                                          & (rows["integration_number"] <= last)]
        hdul.writeto(out)
    return out


@pytest.mark.parity
def test_segmented_file_uses_absolute_integration_numbers(tmp_path):
    """The second segment of an exposure: rscd's first-integration skip and the dark's
    integration choice follow INTSTART, as in jwst."""
    sim = simulate(tmp_path / "sim", subarray="SUB128", ngroups=12, nints=4, seed=8)
    seg = _segment(sim.uncal, tmp_path / sim.uncal.name.replace("_mirimage", "-seg002_mirimage"), 3, 4)
    theirs = run_jwst_detector1(seg, sim.env, tmp_path / "jwst")
    with crds_environment(sim):
        ours = process_file(seg, RunConfig(output_dir=tmp_path / "ours")).products
    for kind in ("rate", "rateints"):
        assert_parity(ours[kind], theirs[kind])
    with fits.open(ours["rate"]) as a, fits.open(theirs["rate"]) as b:
        assert "INT1SKIP" not in a[0].header
        for key in ("INT2SKIP", "INT2BORS", "INT2UGP1"):
            assert a[0].header.get(key) == b[0].header.get(key), key


def test_save_ramp_writes_the_ramp_the_fit_saw(sim_sub256, tmp_path):
    with crds_environment(sim_sub256):
        result = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path, save_ramp=True,
                                                          band_bytes=400_000))
    ramp_path = result.products["ramp"]
    assert ramp_path.name.endswith("_mirimage_ramp.fits")
    with fits.open(ramp_path) as ramp, fits.open(result.products["rate"]) as rate:
        assert ramp[0].header["DATAMODL"] == "RampModel"
        groupdq = ramp["GROUPDQ"].data
        assert ramp["SCI"].data.shape == groupdq.shape == (3, 20, 256, 256)
        jumped = np.bitwise_or.reduce(groupdq & 4, axis=(0, 1)) != 0
        assert jumped.sum() > 50
        assert np.array_equal(jumped, (rate["DQ"].data & 4) != 0)
        # every pixel flag of the ramp reaches the rate's DQ
        assert not np.any(ramp["PIXELDQ"].data & ~rate["DQ"].data)


# 300 kB: each of two threads gets bands of a few rows; 120 kB: a thread's share would be
# mostly halo, so the band pass runs on one thread while the integration pass uses two
@pytest.mark.parametrize("band_bytes", [300_000, 120_000])
def test_two_threads_give_the_same_products(sim_sub256, tmp_path, band_bytes):
    with crds_environment(sim_sub256):
        one = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path / "one", threads=1,
                                                       band_bytes=band_bytes))
        two = process_file(sim_sub256.uncal, RunConfig(output_dir=tmp_path / "two", threads=2,
                                                       band_bytes=band_bytes))
    for kind in ("rate", "rateints"):
        assert_identical_products(one.products[kind], two.products[kind])


def test_default_threads_follow_env_then_affinity(monkeypatch):
    from streamdet.core.engine import default_threads, usable_cpus

    monkeypatch.setenv("STREAMDET_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("STREAMDET_THREADS")
    assert default_threads() == usable_cpus() == len(os.sched_getaffinity(0))


def test_watch_shares_the_cores_among_its_workers(monkeypatch, tmp_path):
    from streamdet.core.engine import usable_cpus
    from streamdet.daemon.daemon import WatchOptions, make_executor

    monkeypatch.delenv("STREAMDET_THREADS", raising=False)
    opts = WatchOptions(inbox=tmp_path, outbox=tmp_path, workers=1)
    make_executor(opts, tmp_path)
    assert opts.config.threads == usable_cpus()
    opts = WatchOptions(inbox=tmp_path, outbox=tmp_path, workers=2 * usable_cpus())
    make_executor(opts, tmp_path)
    assert opts.config.threads == 1
    # an explicit choice stands
    opts = WatchOptions(inbox=tmp_path, outbox=tmp_path, workers=1,
                        config=RunConfig(threads=5))
    make_executor(opts, tmp_path)
    assert opts.config.threads == 5


def test_garbage_collector_is_off_during_a_run_and_restored_after(sim_sub256, tmp_path):
    import gc

    from streamdet.core.errors import BadInputError
    from streamdet.core.plugins import hookimpl
    from streamdet.testing import run_chain

    seen: list[bool] = []

    class Watcher:
        @hookimpl
        def streamdet_step_finished(self, step):
            seen.append(gc.isenabled())

    assert gc.isenabled()
    with crds_environment(sim_sub256):
        run_chain(sim_sub256.uncal, tmp_path / "out", plugins=[Watcher()], only_builtin=True)
    assert seen and not any(seen)
    assert gc.isenabled()
    # a run that fails restores it too, and a collector the caller switched off stays off
    with pytest.raises(BadInputError):
        process_file(tmp_path / "missing_uncal.fits", RunConfig(output_dir=tmp_path))
    assert gc.isenabled()
    gc.disable()
    try:
        with crds_environment(sim_sub256):
            run_chain(sim_sub256.uncal, tmp_path / "again", only_builtin=True)
        assert not gc.isenabled()
    finally:
        gc.enable()


class _LateIntegrationStep:
    """Plugin: a step needing whole integrations placed after jump (an integration pass
    between two band passes), which marks one pixel's group as a jump in integration 2
    and records what it was handed."""

    def __init__(self):
        from streamdet.core.step import Granularity, Step

        seen = self.seen = []

        class MarkAfterJump(Step):
            name = "mark_after_jump"
            implementation = "test"
            after = "jump"
            granularity = Granularity.INTEGRATION
            thread_safe = True

            def process(self, chunk):
                seen.append((tuple(chunk.int_index), chunk.data.shape, chunk.rows))
                if chunk.int_index[0] == 1:
                    chunk.groupdq[0, 3, 10, 20] |= 4

        self.cls = MarkAfterJump

    def plugin(self):
        import types

        from streamdet import hookimpl

        return types.SimpleNamespace(__name__="late_integration_step",
                                     streamdet_steps=hookimpl(lambda: [self.cls]))


def test_integration_step_after_jump_gets_a_pass_of_its_own(sim_sub256, tmp_path):
    """The late INTEGRATION step sees each integration whole, once, after jump; its flag
    reaches ramp_fit (rateints DQ of integration 2 only); products are the same with the
    scratch in memory or in files, with one band or many, on one thread or two."""
    from streamdet.core.plugins import build_registry

    results = {}
    for label, kwargs in (("memory", dict(band_bytes=1 << 30, threads=1)),
                          ("files", dict(band_bytes=150_000, scratch_in_memory_bytes=0,
                                         rateints_in_memory_bytes=0, threads=2))):
        plugin = _LateIntegrationStep()
        registry = build_registry((plugin.plugin(),), only_builtin=True)
        assert registry.order.index("mark_after_jump") == registry.order.index("jump") + 1
        with crds_environment(sim_sub256):
            results[label] = process_file(sim_sub256.uncal,
                                          RunConfig(output_dir=tmp_path / label, **kwargs),
                                          registry=registry)
        ny, nx = 256, 256
        assert sorted(plugin.seen) == [((i,), (1, 20, ny, nx), slice(0, ny)) for i in range(3)]
    with fits.open(results["files"].products["rateints"]) as hdul:
        dq = hdul["DQ"].data
        assert dq[1, 10, 20] & 4 and not dq[0, 10, 20] & 4 and not dq[2, 10, 20] & 4
    for kind in ("rate", "rateints"):
        assert_identical_products(results["memory"].products[kind], results["files"].products[kind])

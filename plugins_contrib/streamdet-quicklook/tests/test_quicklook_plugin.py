"""streamdet-quicklook: registered directly (the test kit) and installed (entry point,
the real ``streamdet process``): the PNG, untouched products, and failures that stay
the plugin's own."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
try:
    from streamdet_quicklook import plugin as quicklook
except ImportError:  # not pip-installed: use the source tree
    sys.path.insert(0, str(PACKAGE_ROOT))
    from streamdet_quicklook import plugin as quicklook

from streamdet import hookimpl
from streamdet.core.dqflags import PIXEL
from streamdet.core.engine import RunConfig, process_file
from streamdet.core.plugins import build_registry
from streamdet.testing import crds_environment, metadata_tree_text, run_chain

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_SIZE = (int(quicklook.FIGSIZE[0] * quicklook.DPI), int(quicklook.FIGSIZE[1] * quicklook.DPI))


@pytest.fixture(autouse=True)
def _quicklook_on(monkeypatch):
    monkeypatch.delenv(quicklook.ENV_SWITCH, raising=False)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """One small simulated exposure for the module (streamdet_sim's is per test)."""
    from streamdet.simulate import simulate

    return simulate(tmp_path_factory.mktemp("quicklook-sim"), subarray="SUB64", ngroups=8,
                    nints=2, seed=3)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def check_png(path: Path) -> None:
    import matplotlib.image

    assert png_size(path) == EXPECTED_SIZE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[:2] == EXPECTED_SIZE[::-1]
    assert np.ptp(pixels[..., :3]) > 0.5, "the figure is blank"


def run_without_quicklook(sim, output_dir: Path):
    """A run with every installed plugin except this one (if it is installed)."""
    registry = build_registry()
    for plugin in list(registry.pm.get_plugins()):
        if plugin is quicklook:
            registry.pm.unregister(plugin)
    config = RunConfig(output_dir=output_dir, overwrite=True)
    with crds_environment(sim):
        return process_file(sim.uncal, config, registry=registry)


def assert_same_products(ours: dict[str, Path], theirs: dict[str, Path]) -> None:
    """Same extensions, bit-identical arrays, same headers but for the creation date."""
    assert ours.keys() == theirs.keys()
    for kind in ours:
        with fits.open(ours[kind]) as a, fits.open(theirs[kind]) as b:
            assert [h.name for h in a] == [h.name for h in b]
            for ha, hb in zip(a, b):
                if ha.data is None:
                    assert hb.data is None
                elif isinstance(ha.data, np.ndarray) and ha.data.dtype.names is None:
                    assert ha.data.dtype == hb.data.dtype and ha.data.shape == hb.data.shape
                    assert ha.data.tobytes() == hb.data.tobytes(), f"{kind} {ha.name} differs"
                elif ha.name == "ASDF":  # the metadata tree, less the time of writing
                    assert metadata_tree_text(ha) == metadata_tree_text(hb), f"{kind} ASDF"
                    continue
                else:
                    assert ha.data.tobytes() == hb.data.tobytes(), f"{kind} {ha.name} differs"
                keys = [k for k in ha.header if k != "DATE"]
                assert keys == [k for k in hb.header if k != "DATE"]
                assert all(ha.header[k] == hb.header[k] for k in set(keys) - {"HISTORY", "COMMENT"})


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_declared_as_a_pure_observer():
    pyproject = tomllib.loads((PACKAGE_ROOT / "pyproject.toml").read_text())
    entry_points = pyproject["project"]["entry-points"]["streamdet.steps"]
    assert entry_points == {"quicklook": "streamdet_quicklook.plugin"}
    assert any(dep.startswith("matplotlib") for dep in pyproject["project"]["dependencies"])
    registry = build_registry((quicklook,))
    hooks = {caller.name for caller in registry.pm.get_hookcallers(quicklook)}
    assert hooks == {"streamdet_exposure_started", "streamdet_exposure_finished"}
    assert not hasattr(quicklook, "streamdet_steps")  # replaces and inserts nothing
    assert registry.order == build_registry().order


def test_dq_summary_counts_each_flag_by_name():
    dq = np.zeros((4, 5), np.uint32)
    dq[0, :3] = PIXEL["DO_NOT_USE"] | PIXEL["SATURATED"]
    dq[1, 0] = PIXEL["JUMP_DET"]
    dq[2, 2] = PIXEL["REFERENCE_PIXEL"] | PIXEL["DO_NOT_USE"]
    assert quicklook.dq_summary(dq) == {"GOOD": 15, "DO_NOT_USE": 4, "SATURATED": 3,
                                        "JUMP_DET": 1, "REFERENCE_PIXEL": 1}


def test_png_beside_products_and_products_untouched(sim, streamdet_run, tmp_path):
    with_plugin = streamdet_run(sim, plugins=[quicklook])
    rate = with_plugin.products["rate"]
    base = rate.name[: -len("_rate.fits")]
    png = rate.with_name(f"{base}_quicklook.png")
    assert png.is_file()
    check_png(png)
    assert leftovers(rate.parent) == []
    assert len(quicklook._chains) == 0  # nothing kept between exposures

    without = run_without_quicklook(sim, tmp_path / "without")
    assert not list((tmp_path / "without").glob("*.png"))
    assert_same_products(with_plugin.products, without.products)


def test_installed_through_the_real_cli(sim, tmp_path):
    env = {**os.environ, **sim.env, "STREAMDET_QUICKLOOK": "on", "COLUMNS": "200"}
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m, streamdet_quicklook.plugin; "
         "print(any(ep.value == 'streamdet_quicklook.plugin' "
         "for ep in m.entry_points(group='streamdet.steps')))"],
        env=env, capture_output=True, text=True, timeout=120)
    if probe.stdout.strip() != "True":
        # not pip-installed: give the subprocess the same entry point pip would write
        site = tmp_path / "site"
        info = site / "streamdet_quicklook-0.1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: streamdet-quicklook\n"
                                       "Version: 0.1.0\n")
        (info / "entry_points.txt").write_text(
            "[streamdet.steps]\nquicklook = streamdet_quicklook.plugin\n")
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), str(PACKAGE_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    listed = subprocess.run([sys.executable, "-m", "streamdet.cli", "plugins"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    line = next(l for l in listed.stdout.splitlines() if l.startswith("streamdet-quicklook "))
    hooks = set(line.split("quicklook: ", 1)[1].split(", "))
    assert hooks == {"streamdet_exposure_started", "streamdet_exposure_finished"}

    out = tmp_path / "products"
    done = subprocess.run([sys.executable, "-m", "streamdet.cli", "process", str(sim.uncal),
                           "-o", str(out), "-q"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "quicklook" not in done.stderr  # no warning
    base = sim.uncal.name[: -len("_uncal.fits")]
    check_png(out / f"{base}_quicklook.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{base}_{kind}" for kind in ("quicklook.png", "rate.fits", "rateints.fits"))


class _DeleteInputWhenStarted:
    """A second observer that makes the input unreadable once the engine has it open."""

    @hookimpl
    def streamdet_exposure_started(self, exposure, chain):
        exposure.meta.path.unlink()


def test_unreadable_input_does_not_fail_the_run(sim, streamdet_run, tmp_path, caplog):
    uncal = tmp_path / "input" / sim.uncal.name
    uncal.parent.mkdir()
    shutil.copy(sim.uncal, uncal)
    out = tmp_path / "products"
    with caplog.at_level(logging.WARNING, logger="streamdet.quicklook"):
        result = run_chain(uncal, out, sim=sim, plugins=[quicklook, _DeleteInputWhenStarted()])
    assert not uncal.exists()
    assert result.products["rate"].is_file() and result.products["rateints"].is_file()
    assert not list(out.glob("*.png")) and leftovers(out) == []
    message = "\n".join(r.getMessage() for r in caplog.records if r.name == "streamdet.quicklook")
    assert "no quick-look for" in message and uncal.name in message
    assert "FileNotFoundError" in message


def test_unwritable_png_and_missing_matplotlib_do_not_fail_the_run(sim, streamdet_run,
                                                                   monkeypatch, caplog):
    first = streamdet_run(sim, plugins=[quicklook])
    rate = first.products["rate"]
    png = rate.with_name(rate.name.replace("_rate.fits", "_quicklook.png"))
    # a directory where the PNG should go: nothing can be renamed onto it
    png.unlink()
    png.mkdir()
    with caplog.at_level(logging.WARNING, logger="streamdet.quicklook"), crds_environment(sim):
        blocked = process_file(sim.uncal, RunConfig(output_dir=rate.parent, overwrite=True),
                               registry=build_registry((quicklook,)))
    assert blocked.products["rate"].is_file() and png.is_dir()
    assert leftovers(rate.parent) == []
    assert any("no quick-look" in r.getMessage() for r in caplog.records)
    png.rmdir()

    # installed without its dependency: still only a warning
    caplog.clear()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with caplog.at_level(logging.WARNING, logger="streamdet.quicklook"):
        bare = streamdet_run(sim, plugins=[quicklook])
    assert bare.products["rate"].is_file()
    assert not list(bare.products["rate"].parent.glob("*.png"))
    assert any("ImportError" in r.getMessage() or "ModuleNotFoundError" in r.getMessage()
               for r in caplog.records)


def test_switched_off_by_environment(sim, streamdet_run, monkeypatch):
    monkeypatch.setenv(quicklook.ENV_SWITCH, "off")
    result = streamdet_run(sim, plugins=[quicklook])
    assert result.products["rate"].is_file()
    assert not list(result.products["rate"].parent.glob("*.png"))

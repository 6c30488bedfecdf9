"""Packages imported without their ``__init__`` until one of their own names is needed
(streamdet.core.deferred_import), and the products' use of it: a run that writes
products does not import what stdatamodels.jwst.datamodels' and astropy.nddata's
``__init__`` pull in, and both packages still work whole for everyone else."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from streamdet.core.deferred_import import defer_package_init


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package ``deferpkg`` whose ``__init__`` counts its runs in ``deferpkg_runs``."""
    root = tmp_path / "deferpkg"
    root.mkdir()
    (root / "__init__.py").write_text(textwrap.dedent("""
        import time, deferpkg_runs
        deferpkg_runs.count += 1
        time.sleep(0.05)  # a slow __init__: concurrent first uses must wait for it
        from . import other
        from .sub import VALUE
        WHOLE = VALUE + other.OTHER
    """))
    (root / "sub.py").write_text("VALUE = 40\n")
    (root / "other.py").write_text("OTHER = 2\n")
    (tmp_path / "deferpkg_runs.py").write_text("count = 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "deferpkg"
    for name in [m for m in sys.modules if m.split(".")[0] in ("deferpkg", "deferpkg_runs")]:
        del sys.modules[name]


def test_submodules_import_without_the_init(package):
    import deferpkg_runs

    defer_package_init(package)
    from deferpkg.sub import VALUE

    assert VALUE == 40
    assert deferpkg_runs.count == 0
    assert "deferpkg.other" not in sys.modules


def test_first_use_of_a_package_name_runs_the_init_once(package):
    import deferpkg_runs

    defer_package_init(package)
    import deferpkg.sub  # noqa: F401

    results = []
    threads = [threading.Thread(target=lambda: results.append(sys.modules[package].WHOLE))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    from deferpkg import WHOLE, other

    assert results == [42] * 4 and WHOLE == 42 and other.OTHER == 2
    assert deferpkg_runs.count == 1
    with pytest.raises(AttributeError):
        sys.modules[package].NOT_THERE
    assert deferpkg_runs.count == 1


def test_a_star_import_runs_the_init(package):
    import deferpkg_runs

    defer_package_init(package)
    import deferpkg.sub  # noqa: F401

    names: dict = {}
    exec(f"from {package} import *", names)
    assert names["WHOLE"] == 42 and deferpkg_runs.count == 1


def test_an_imported_package_is_left_alone(package):
    import deferpkg

    defer_package_init(package)
    assert sys.modules[package] is deferpkg and deferpkg.WHOLE == 42


#: run in a fresh interpreter: build and write the three product models as the writer
#: does, list what got imported, then use both packages whole
_FRESH_PROCESS = """
import sys, tempfile, pathlib
from streamdet.core import products
with products._asdf_scope():
    models = [products.new_model(n) for n in ("ImageModel", "CubeModel", "RampModel")]
heavy = [m for m in ("astropy.modeling", "scipy.sparse", "astropy.coordinates",
                     "astropy.nddata.nddata", "stdatamodels.jwst.datamodels.wcs_ref_models")
         if m in sys.modules]
print("HEAVY", heavy)
from stdatamodels.jwst.datamodels import ImageModel, FlatModel, open as dm_open
from astropy.nddata import NDData, bitmask
import stdatamodels.jwst.datamodels as dm
assert type(models[0]) is ImageModel and dm.CubeModel is type(models[1])
assert "FlatModel" in dm.__all__ and NDData([1.0]).data.shape == (1,)
path = pathlib.Path(tempfile.mkdtemp()) / "x_rate.fits"
with products._asdf_scope():
    model = products.new_model("ImageModel", data=__import__("numpy").zeros((2, 2), "f4"))
    model.save(path)
with dm_open(path) as back:
    assert type(back).__name__ == "ImageModel" and back.data.shape == (2, 2)
print("WHOLE OK")
"""


def test_products_leave_the_heavy_inits_out_and_packages_work_whole():
    done = subprocess.run([sys.executable, "-c", _FRESH_PROCESS], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY []" in done.stdout, done.stdout
    assert "WHOLE OK" in done.stdout

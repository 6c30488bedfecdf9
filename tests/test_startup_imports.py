"""What a plain one-shot ``streamdet process`` run imports: a module it does not need
costs every run its import time (the fixed cost of a small exposure is mostly imports).
Run in a fresh interpreter, as a user runs it, on a small simulated exposure."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from streamdet.simulate import simulate

#: modules a plain run (no configuration file, references from CRDS) has no use for
#: -> why they would be imported
NOT_NEEDED = {
    "pydantic": "typer converting option values (streamdet.cli_values does that)",
    "tomllib": "reading a TOML configuration file (none given)",
}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("startup"), subarray="SUB64", ngroups=5,
                    nints=2, seed=3)


def test_a_plain_run_imports_only_what_it_needs(sim, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, atexit\n"
        f"watched = {sorted(NOT_NEEDED)!r}\n"
        "atexit.register(lambda: print('IMPORTED', [m for m in watched if m in sys.modules]))\n"
        f"sys.argv = ['streamdet', 'process', '--overwrite', '-o', {str(out)!r}, "
        f"{str(sim.uncal)!r}]\n"
        "from streamdet.cli import main\n"
        "main()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    env.update(sim.env, STREAMDET_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / f"{sim.uncal.name.replace('_uncal', '_rate')}").is_file()
    imported = done.stdout.strip().splitlines()[-1]
    assert imported == "IMPORTED []", {m: NOT_NEEDED[m] for m in NOT_NEEDED if m in imported}


def test_the_products_schemas_load_when_the_products_are_written(sim):
    """Not on a thread of their own from the run's start: loading them holds the GIL,
    as does most of a run meanwhile, and the contention cost more than the overlap."""
    code = (
        "import sys, threading\n"
        "from streamdet.core.exposure import Exposure\n"
        "from streamdet.core.products import InputMetadata\n"
        f"with Exposure({str(sim.uncal)!r}) as exposure:\n"
        "    source = InputMetadata(exposure.meta)\n"
        "    print(sorted(t.name for t in threading.enumerate()),\n"
        "          'stdatamodels' in sys.modules)\n"
        "    model = source.model()\n"
        "    print(type(model).__name__, model.meta.exposure.ngroups,\n"
        "          'stdatamodels' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, after = done.stdout.strip().splitlines()[-2:]
    assert before == "['MainThread'] False"
    assert after == "RampModel 5 True"


@pytest.mark.parametrize("chosen", [None, "2"], ids=["default", "user-chosen"])
def test_a_one_shot_run_neither_sweeps_nor_spins(sim, tmp_path, chosen):
    """The cyclic collector stays off through a one-file run (its sweeps over the fresh
    imports found nothing to free), and OpenBLAS gets one thread unless the user chose."""
    out = tmp_path / "out"
    code = (
        "import gc, os, sys, atexit\n"
        "atexit.register(lambda: print('STATE', os.environ.get('OPENBLAS_NUM_THREADS'), "
        "gc.isenabled(), gc.get_stats()[2]['collections']))\n"
        f"sys.argv = ['streamdet', 'process', '--overwrite', '-o', {str(out)!r}, "
        f"{str(sim.uncal)!r}]\n"
        "from streamdet.cli import main\n"
        "main()\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CRDS_") and k != "OPENBLAS_NUM_THREADS"}
    env.update(sim.env, STREAMDET_DISABLE_PLUGIN_AUTOLOAD="1")
    if chosen:
        env["OPENBLAS_NUM_THREADS"] = chosen
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = done.stdout.strip().splitlines()[-1]
    assert state == f"STATE {chosen or '1'} False 0"

"""jwst as the oracle: run its Detector1Pipeline in a fresh process, and compare products.

crds configures itself when first imported and caches mappings per process, so jwst
always runs in a subprocess whose environment is the simulated cache's ``env``; an audit
hook makes any network access fail loudly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Mapping

from streamdet.testing import (KERNEL, PRODUCTS, Tolerance, assert_arrays_agree,
                               assert_products_agree)

NO_NETWORK = """
import sys
def _no_network(event, args):
    if event in ("socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.bind"):
        raise RuntimeError(f"network access attempted: {event} {args!r}")
sys.addaudithook(_no_network)
"""


def run_python(code: str, env: dict[str, str], timeout: float = 600.0) -> str:
    """Run ``code`` in a fresh interpreter with ``env`` (this process's CRDS_* removed)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRDS_")}
    full_env.update(env)
    proc = subprocess.run([sys.executable, "-c", NO_NETWORK + textwrap.dedent(code)],
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def run_jwst_detector1(uncal: Path, env: dict[str, str], outdir: Path,
                       steps: dict | None = None, products=("rate", "rateints")) -> dict[str, Path]:
    """jwst's Detector1Pipeline with references from the CRDS cache only."""
    outdir.mkdir(parents=True, exist_ok=True)
    code = f"""
    from jwst.pipeline import Detector1Pipeline
    Detector1Pipeline.call({str(uncal)!r}, output_dir={str(outdir)!r}, save_results=True,
                           steps={steps or {}!r})
    """
    run_python(code, env)
    stem = uncal.name.replace("_uncal.fits", "")
    files = {k: outdir / f"{stem}_{k}.fits" for k in products}
    for f in files.values():
        assert f.exists(), f
    return files


def last_json(stdout: str):
    return json.loads(stdout.strip().splitlines()[-1])


def assert_parity(ours, theirs, tolerance: Tolerance | None = None, extensions=None):
    """The tests' one parity check, with the tolerances stated in streamdet/testing.py
    (the plugin test kit's, so plugin authors compare as we do):

    - two product files (paths): values within ``PRODUCTS`` (1e-4 relative on >= 99.9 %
      of the pixels finite in both), NaN in the same places, DQ bit-identical on >= 99.99 %;
      ``extensions`` (default SCI, ERR, VAR_POISSON, VAR_RNOISE, DQ) names what to compare;
    - two mappings name -> array (a kernel against stcal on the same arrays): every value
      within ``KERNEL`` (1e-5 relative + 1e-7 absolute), NaN in the same places, DQ
      bit-identical.

    Where a kernel must give exactly jwst's answer (DQ flags, counts), tests compare with
    plain equality instead."""
    if isinstance(ours, Mapping):
        return assert_arrays_agree(ours, theirs, tolerance or KERNEL)
    if extensions is None:
        return assert_products_agree(ours, theirs, tolerance or PRODUCTS)
    return assert_products_agree(ours, theirs, tolerance or PRODUCTS, extensions)

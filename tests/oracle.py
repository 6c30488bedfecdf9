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


# the comparison and its tolerances are the plugin test kit's
from streamdet.testing import assert_products_agree as assert_parity  # noqa: E402,F401

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

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


# -- comparison ---------------------------------------------------------------------------
VALUE_EXTENSIONS = ("SCI", "ERR", "VAR_POISSON", "VAR_RNOISE")
RTOL = 1e-4               # relative tolerance on values
MIN_VALUE_AGREEMENT = 0.999   # fraction of pixels finite in both that must agree within RTOL
MIN_DQ_AGREEMENT = 0.9999     # fraction of pixels whose DQ must be bit-identical


@dataclass
class Agreement:
    extension: str
    fraction: float        # agreeing pixels / compared pixels
    compared: int
    nan_mismatch: int      # pixels NaN in one product and not in the other
    worst: float           # largest relative difference among finite pixels

    def __str__(self) -> str:
        return (f"{self.extension}: {self.fraction:.6f} of {self.compared} agree, "
                f"{self.nan_mismatch} NaN mismatches, worst rel diff {self.worst:.3g}")


def compare_extension(ours: np.ndarray, theirs: np.ndarray, extension: str) -> Agreement:
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{extension}: shape {ours.shape} != {theirs.shape}"
    if extension == "DQ":
        same = ours.astype(np.uint32) == theirs.astype(np.uint32)
        return Agreement(extension, float(same.mean()), same.size, 0, 0.0)
    ours = ours.astype(np.float64)
    theirs = theirs.astype(np.float64)
    nan_ours, nan_theirs = np.isnan(ours), np.isnan(theirs)
    both = np.isfinite(ours) & np.isfinite(theirs)
    diff = np.abs(ours[both] - theirs[both])
    scale = np.abs(theirs[both])
    rel = np.where(scale > 0, diff / np.where(scale > 0, scale, 1), diff)
    ok = diff <= RTOL * scale + 1e-30
    worst = float(rel.max()) if rel.size else 0.0
    return Agreement(extension, float(ok.mean()) if ok.size else 1.0, int(both.sum()),
                     int((nan_ours != nan_theirs).sum()), worst)


def compare_products(ours: Path, theirs: Path) -> list[Agreement]:
    with fits.open(ours) as a, fits.open(theirs) as b:
        return [compare_extension(a[ext].data, b[ext].data, ext)
                for ext in (*VALUE_EXTENSIONS, "DQ")]


def assert_parity(ours: Path, theirs: Path) -> list[Agreement]:
    """The tolerances of the parity tests: values within RTOL on >= 99.9 % of the pixels
    finite in both, NaN in the same places, DQ bit-identical on >= 99.99 %."""
    report = compare_products(ours, theirs)
    text = f"{ours.name} vs jwst:\n  " + "\n  ".join(map(str, report))
    for agreement in report:
        if agreement.extension == "DQ":
            assert agreement.fraction >= MIN_DQ_AGREEMENT, text
        else:
            assert agreement.nan_mismatch == 0, text
            assert agreement.fraction >= MIN_VALUE_AGREEMENT, text
    return report

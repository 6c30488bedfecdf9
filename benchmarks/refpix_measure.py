"""Time of refpix's reference-level measurement (``measure_reference_drift``) for one
MIRI full-frame integration: the 8 reference columns of 1024 rows and ``--groups``
groups, with read noise, a slow drift, a few NaNs and a few DO_NOT_USE pixels.

    python benchmarks/refpix_measure.py [--groups 50] [--repeat 20]

Prints the median and the minimum wall time of one call over ``--repeat`` calls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from streamdet.algorithms.refpix import MIRI_FULL_FRAME_SHAPE, measure_reference_drift
from streamdet.core import dqflags


def full_frame_reference_columns(ngroups: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    nrows, ncols = MIRI_FULL_FRAME_SHAPE
    drift = np.cumsum(rng.normal(0, 2, (ngroups, 1, 8)), axis=0)
    columns = (14000 + drift + rng.normal(0, 5, (ngroups, nrows, 8))).astype(np.float32)
    columns[rng.integers(1, ngroups, 6), rng.integers(0, nrows, 6), rng.integers(0, 8, 6)] = np.nan
    pixeldq = np.zeros((nrows, 8), np.uint32)
    pixeldq[rng.integers(0, nrows, 12), rng.integers(0, 8, 12)] = dqflags.DO_NOT_USE
    return columns, pixeldq, ncols


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    columns, pixeldq, ncols = full_frame_reference_columns(args.groups)
    measure_reference_drift(columns, pixeldq, ncols)
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        measure_reference_drift(columns, pixeldq, ncols)
        times.append(time.perf_counter() - start)
    print(f"measure_reference_drift, {args.groups} groups x {MIRI_FULL_FRAME_SHAPE[0]} rows: "
          f"median {1e3 * np.median(times):.2f} ms, min {1e3 * min(times):.2f} ms "
          f"({args.repeat} calls)")


if __name__ == "__main__":
    main()

"""ramp_fit's optional-results product (jwst's ``_fitopt.fits``, ``RampFitOutputModel``):
scratch storage that streams like rateints, and the writer.

What the product holds, as stcal 1.20's OLS_C fitter fills it (``save_opt=True``), per
integration ``i``, segment ``s`` (the fitted segments of the ramp in time order) and pixel:

- ``slope``, ``sigslope``, ``var_poisson``, ``var_rnoise``, ``yint``, ``sigyint``,
  ``weights``: float32 ``[nints, nsegs, ny, nx]``, where ``nsegs`` is the largest number
  of fitted segments of any ramp of any integration (so only known when the whole
  exposure is fitted); slots past a ramp's own segments are 0.
  For a segment of n >= 3 groups (start group j0 of the trimmed ramp): with the optimal
  weights ``w = |(k - mid)/mid|**P / rn**2`` over x = j0 + k, ``slope`` is the weighted
  least-squares slope over group_time, ``sigslope = sqrt(S_w / D)``, ``yint =
  (S_xx S_y - S_x S_xy) / D``, ``sigyint = sqrt(S_xx / D)``
  (D = S_w S_xx - S_x**2; NaN samples count as 0), ``weights = 1 / var_rnoise``.
  n = 2: ``sigslope = sigyint = sqrt(2) rn``, ``yint = d1 (1 - (j0 + 1)) + d0 (j0 + 1)``.
  n = 1: slope and the variances as in the rate, ``weights = 1 / var_rnoise``, the rest 0.
  (rn: the per-read noise in electrons, as in the fit.)
- ``pedestal``: float32 ``[nints, ny, nx]``: first sample of the trimmed ramp minus the
  integration's slope times ``((nframes + 1)/2 + dropframes1) / (nframes + groupgap)``;
  0 when the integration is SATURATED or the value is NaN.
- ``crmag``: float32 ``[nints, ncrs, ny, nx]``: per integration the differences
  ``data[g] - data[g-1]`` at every group g > 0 flagged JUMP_DET, in group order;
  ``ncrs`` the largest count over all ramps (0 is a valid axis size).

The fit runs in bands of rows spanning every integration; :class:`FitoptStore` takes each
band's results into raw scratch files sized for the largest possible segment count (a ramp
of n groups has at most ``(n + 1) // 2`` segments, at most ``n - 1`` jumps), remembers the
largest counts seen, and :func:`write_fitopt` writes the product at those sizes (metadata through
stdatamodels, the arrays streamed plane by plane), so that memory does not grow with the
number of integrations.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from streamdet.algorithms.ramp_fit_opt import SEGMENT_ARRAYS, jump_bound, segment_bound
from streamdet.core.buffers import read_at, write_at


class FitoptStore:
    """The optional results of a whole exposure, band by band, in scratch files.

    Each array's scratch file is ``[nints, bound, ny, nx]`` float32 (``bound`` the largest
    possible count, pedestal ``[nints, ny, nx]``); :meth:`compact` copies the first
    ``nsegs``/``ncrs`` slots, one plane at a time, into big-endian files of the product's
    exact size, which the writer hands to stdatamodels as memory maps (astropy writes
    big-endian contiguous arrays straight from them, without a copy in memory).
    """

    def __init__(self, nints: int, ngroups: int, ny: int, nx: int, directory: Path):
        self.nints, self.ny, self.nx = nints, ny, nx
        self.directory = Path(directory)
        self.bounds = {name: segment_bound(ngroups) for name in SEGMENT_ARRAYS}
        self.bounds["crmag"] = jump_bound(ngroups)
        self.bounds["pedestal"] = 1
        self.paths = {}
        for name, bound in self.bounds.items():
            path = self.directory / f"fitopt_{name}.raw"
            with open(path, "wb") as f:
                f.truncate(nints * bound * ny * nx * 4)
            self.paths[name] = path
        self.nsegs = 0
        self.ncrs = 0
        self._written: dict[tuple[int, int, int], tuple[int, int]] = {}
        self._lock = threading.Lock()

    def put(self, rows: slice, results: dict[str, np.ndarray], nsegs: int, ncrs: int) -> None:
        """Store a band of rows: ``results[name]`` is ``[nints, k, nrows, nx]`` for the
        per-segment arrays (k >= ``nsegs``) and crmag (k >= ``ncrs``), ``[nints, nrows,
        nx]`` for the pedestal."""
        r0, r1, _ = rows.indices(self.ny)
        for integ in range(self.nints):
            flat = {name: np.asarray(a[integ]).reshape(*a.shape[1:-2], -1)
                    for name, a in results.items()}
            self.put_pixels(integ, r0 * self.nx, flat, nsegs, ncrs)

    def put_pixels(self, integ: int, first: int, results: dict[str, np.ndarray], nsegs: int,
                   ncrs: int) -> None:
        """Store one integration of the pixels ``first, first + 1, ...`` (flat index in
        the frame): ``results[name]`` is ``[k, npix]`` for the per-segment arrays (k >=
        ``nsegs``) and crmag (k >= ``ncrs``), ``[npix]`` for the pedestal; ``nsegs`` and
        ``ncrs`` are these pixels' most segments and jumps (the slots past them are 0).
        Storing the same pixels again (a band the engine re-runs) replaces what was
        there, the counts included."""
        npix = np.asarray(results["pedestal"]).shape[-1]
        if nsegs > self.bounds["slope"] or ncrs > self.bounds["crmag"]:
            raise ValueError(f"fitopt pixels have {nsegs} segments / {ncrs} jumps, more than "
                             f"a ramp can have ({self.bounds['slope']} / {self.bounds['crmag']})")
        key = (integ, first, npix)
        with self._lock:
            before = self._written.get(key, (0, 0))
        plane = self.ny * self.nx * 4
        for name, path in self.paths.items():
            data = np.asarray(results[name], dtype=np.float32)
            if name == "pedestal":
                data = data[None]
            used = {"pedestal": 1, "crmag": ncrs}.get(name, nsegs)
            # slots a previous store of these pixels filled are cleared
            span = max(used, {"pedestal": 1, "crmag": before[1]}.get(name, before[0]))
            fd = os.open(path, os.O_WRONLY)
            try:
                for slot in range(span):
                    piece = (np.ascontiguousarray(data[slot]) if slot < used
                             else np.zeros(npix, np.float32))
                    write_at(fd, piece, (integ * self.bounds[name] + slot) * plane + first * 4)
            finally:
                os.close(fd)
        with self._lock:
            self._written[key] = (nsegs, ncrs)
            self.nsegs = max(n for n, _ in self._written.values())
            self.ncrs = max(c for _, c in self._written.values())

    def count(self, name: str) -> int:
        return {"pedestal": 1, "crmag": self.ncrs}.get(name, self.nsegs)

    def compact(self, name: str) -> np.ndarray:
        """The product's array ``name`` at its final size: a read-only big-endian memory
        map of a scratch file written here, one plane at a time."""
        count, bound = self.count(name), self.bounds[name]
        shape = ((self.nints, self.ny, self.nx) if name == "pedestal"
                 else (self.nints, count, self.ny, self.nx))
        if count == 0:
            return np.zeros(shape, ">f4")
        out = self.directory / f"fitopt_{name}.be"
        plane = np.empty((self.ny, self.nx), np.float32)
        with open(self.paths[name], "rb", buffering=0) as src, open(out, "wb") as dst:
            for integ in range(self.nints):
                for slot in range(count):
                    if not read_at(src.fileno(), plane, (integ * bound + slot) * plane.nbytes):
                        raise OSError(f"{self.paths[name]} ends early")
                    dst.write(plane.astype(">f4").tobytes())
        return np.memmap(out, dtype=">f4", mode="r", shape=shape)


def write_fitopt(path: Path, store: FitoptStore, source, record) -> None:
    """Write ``path`` as jwst's RampFitOutputModel: the metadata of the input exposure
    (``source``, core/products.py's InputMetadata, as jwst's
    ``opt_model.update(input_model)``) with the run's ``record`` (keywords, HISTORY) on
    top, and the stored arrays at the exposure's segment and jump counts.

    stdatamodels writes the model's metadata (primary header, ASDF extension); the arrays
    are streamed into their extensions one plane at a time, so that memory does not grow
    with the number of integrations (stdatamodels reads them back from the extensions,
    as the schema places them). Written under a temporary name and renamed into place."""
    from astropy.io import fits
    from stdatamodels.jwst import datamodels

    from streamdet.core.products import _publish, _temporary, quiet_long_cards

    tmp = _temporary(path)
    name = str(tmp)
    meta_file = store.directory / "fitopt_meta.fits"
    try:
        with quiet_long_cards():
            with datamodels.RampFitOutputModel() as model:
                model.update(source.model())
                model.meta.filename = path.name
                model.to_fits(str(meta_file), overwrite=True)
            with fits.open(meta_file) as meta_hdus:
                primary = meta_hdus[0].header.copy()
                asdf_hdu = fits.BinTableHDU(meta_hdus["ASDF"].data.copy(),
                                            header=meta_hdus["ASDF"].header.copy(), name="ASDF")
            for key, value in record.keywords.items():
                primary[key] = value
            for line in record.history:
                primary.add_history(line)
            fits.PrimaryHDU(header=primary).writeto(name, overwrite=True, output_verify="silentfix")
            for array in (*SEGMENT_ARRAYS, "pedestal", "crmag"):
                _stream_array(name, store, array)
            fits.append(name, asdf_hdu.data, header=asdf_hdu.header)
        _publish([(tmp, path)])
    finally:
        tmp.unlink(missing_ok=True)
        meta_file.unlink(missing_ok=True)


def _stream_array(name: str, store: FitoptStore, array: str) -> None:
    from astropy.io import fits

    count, bound = store.count(array), store.bounds[array]
    shape = ((store.nints, store.ny, store.nx) if array == "pedestal"
             else (store.nints, count, store.ny, store.nx))
    header = fits.Header([("XTENSION", "IMAGE"), ("BITPIX", -32), ("NAXIS", len(shape))])
    for axis, size in enumerate(reversed(shape), start=1):
        header[f"NAXIS{axis}"] = size
    header["PCOUNT"], header["GCOUNT"] = 0, 1
    header["EXTNAME"], header["EXTVER"] = array.upper(), 1
    stream = fits.StreamingHDU(name, header)
    plane = np.empty((store.ny, store.nx), np.float32)
    with open(store.paths[array], "rb", buffering=0) as src:
        for integ in range(store.nints):
            for slot in range(count):
                if not read_at(src.fileno(), plane, (integ * bound + slot) * plane.nbytes):
                    raise OSError(f"{store.paths[array]} ends early")
                stream.write(plane.astype(">f4"))
    stream.close()

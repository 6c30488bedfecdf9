"""Rate products: the arrays a rate-producing step fills, and writing them as
``_rate.fits`` (ImageModel) and ``_rateints.fits`` (CubeModel) that jwst reads as its own.

Files are written to a hidden temporary name in the output directory and renamed into
place, so a reader never sees a partial product.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np
from astropy.io import fits

from .buffers import read_at, write_at
from .errors import BadInputError
from .exposure import ExposureMeta

#: primary-header keywords of the input that describe its data layout, not the exposure
_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "NAXIS3", "NAXIS4", "EXTEND",
               "BZERO", "BSCALE", "PCOUNT", "GCOUNT", "XTENSION", "EXTNAME", "EXTVER",
               "CHECKSUM", "DATASUM", "FILENAME", "DATAMODL", "DATE"}

#: exposure-time and WCS keywords that jwst carries on the SCI extension
_SCI_KEYS = ("MJD-BEG", "MJD-AVG", "MJD-END", "XPOSURE", "TELAPSE", "WCSAXES", "CRPIX1",
             "CRPIX2", "CRVAL1", "CRVAL2", "CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "CDELT1",
             "CDELT2", "PC1_1", "PC1_2", "PC2_1", "PC2_2", "S_REGION", "RA_REF", "DEC_REF",
             "ROLL_REF", "V2_REF", "V3_REF", "VPARITY", "V3I_YANG", "RA_V1", "DEC_V1", "PA_V3",
             "VELOSYS")


#: status keywords jwst's Detector1 writes for steps outside streamdet's built-in chain;
#: recorded SKIPPED unless a plugin step that sets the keyword ran
JWST_ONLY_STATUS = ("S_GRPSCL", "S_MIREMI", "S_IPC", "S_CHGMIG", "S_PCTFRM", "S_CLNFNS",
                    "S_PERSIS", "S_GANSCL", "S_SUPERB")


@dataclass
class RateArrays:
    """Rate, its error and variances and DQ; 2-D for the exposure, 3-D per integration."""

    sci: np.ndarray
    err: np.ndarray
    dq: np.ndarray
    var_poisson: np.ndarray
    var_rnoise: np.ndarray

    EXTENSIONS = ("SCI", "ERR", "DQ", "VAR_POISSON", "VAR_RNOISE")

    @classmethod
    def allocate(cls, shape: tuple[int, ...]) -> "RateArrays":
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32),
                   np.zeros(shape, np.uint32), np.zeros(shape, np.float32),
                   np.zeros(shape, np.float32))

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, f.name) for f in fields(self)]

    def put(self, index, other: "RateArrays") -> None:
        for mine, theirs in zip(self.arrays(), other.arrays()):
            mine[index] = theirs


class CubeStore:
    """Arrays with an integration axis first (rateints ``[nints, ny, nx]``, a saved ramp
    ``[nints, ngroups, ny, nx]``) kept in raw scratch files, so that memory does not grow
    with the number of integrations: bands are written with positioned writes (a band's
    rows of one plane are one stretch of the file) and the product is streamed out one
    integration at a time. (Memory maps would cost page faults and, when unmapped, TLB
    shootdowns that stall the other band threads.)"""

    def __init__(self, shape: tuple[int, ...], directory: Path | None,
                 extensions: tuple[tuple[str, type], ...] | None = None):
        self.shape = tuple(shape)
        self.extensions = extensions or tuple(zip(RateArrays.EXTENSIONS, RATE_DTYPES))
        self.files = []  # (open nameless file, dtype) per extension
        for extname, dtype in self.extensions:
            # nameless (O_TMPFILE, else unlinked at once): nothing is left behind however
            # the process ends; the space is freed when the file is closed
            f = tempfile.TemporaryFile(prefix=f"streamdet-{extname.lower()}-", dir=directory)
            f.truncate(int(np.prod(self.shape)) * np.dtype(dtype).itemsize)
            self.files.append((f, np.dtype(dtype)))

    def close(self) -> None:
        for f, _ in self.files:
            f.close()

    def put(self, index, other) -> None:
        """Store ``other`` (RateArrays, or arrays in the order of the extensions) at
        ``index``: every leading axis whole and a slice of rows (``np.s_[:, rows]``)."""
        arrays = other.arrays() if isinstance(other, RateArrays) else other
        index = index if isinstance(index, tuple) else (index,)
        rows = index[-1]
        if (len(index) != len(self.shape) - 1 or not isinstance(rows, slice)
                or any(i != slice(None) for i in index[:-1])):
            raise ValueError(f"CubeStore.put takes whole leading axes and a row slice, not {index}")
        ny, nx = self.shape[-2:]
        r0, r1, step = rows.indices(ny)
        if step != 1:
            raise ValueError("CubeStore.put takes contiguous rows")
        for (f, dtype), theirs in zip(self.files, arrays):
            pieces = np.ascontiguousarray(theirs, dtype=dtype).reshape(-1, (r1 - r0) * nx)
            plane_bytes = ny * nx * dtype.itemsize
            for j, piece in enumerate(pieces):
                write_at(f.fileno(), piece, j * plane_bytes + r0 * nx * dtype.itemsize)

    def plane(self, k: int, i: int) -> np.ndarray:
        """Extension ``k``'s integration ``i`` (a fresh array)."""
        f, dtype = self.files[k]
        out = np.empty(self.shape[1:], dtype)
        if not read_at(f.fileno(), out, i * out.nbytes):
            raise OSError(f"scratch file of {self.extensions[k][0]} ends before integration {i}")
        return out


RATE_DTYPES = (np.float32, np.float32, np.uint32, np.float32, np.float32)


def check_writable(paths: Iterable[Path], overwrite: bool, source: Path) -> None:
    for path in paths:
        if path.is_dir():
            raise BadInputError(f"{source}: product path {path} is a directory")
        if path.exists() and not overwrite:
            raise BadInputError(f"{source}: product {path} exists; use --overwrite to replace it")


def primary_header(meta: ExposureMeta, datamodel: str, filename: str,
                   keywords: dict[str, object], history: list[str]) -> fits.Header:
    hdr = fits.Header()
    for card in meta.header.cards:
        if card.keyword in _STRUCTURAL or card.keyword in ("", "COMMENT", "HISTORY"):
            continue
        hdr.append(card, end=True)
    hdr["DATE"] = (_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3],
                   "UTC date file created")
    hdr["FILENAME"] = (filename, "Name of the file")
    hdr["DATAMODL"] = (datamodel, "Type of data model")
    for key in JWST_ONLY_STATUS:
        hdr[key] = "SKIPPED"
    for key, value in keywords.items():
        hdr[key] = value
    for line in history:
        hdr.add_history(line)
    return hdr


def _sci_header(meta: ExposureMeta) -> fits.Header:
    hdr = fits.Header()
    sci = meta.extra.get("sci_header")
    if sci is not None:
        for key in _SCI_KEYS:
            if key in sci:
                hdr[key] = (sci[key], sci.comments[key])
    return hdr


def write_products(meta: ExposureMeta, outputs: dict[str, Path], rate: RateArrays,
                   rateints: "RateArrays | CubeStore", keywords: dict[str, object],
                   history: list[str], placed: list | None = None) -> None:
    """Write ``outputs['rate']`` and ``outputs['rateints']``: both go to temporary names
    first and are renamed into place only when both are complete. Each product renamed
    into place is appended to ``placed`` as ``(path, st_dev, st_ino)``, so that a caller
    whose run fails later can withdraw exactly the files it wrote."""
    written: list[tuple[Path, Path]] = []

    def write(kind: str, arrays, model: str, tmp: Path) -> None:
        primary = fits.PrimaryHDU(header=primary_header(meta, model, outputs[kind].name,
                                                        keywords, history))
        if isinstance(arrays, CubeStore):
            _stream_cube(tmp, primary, arrays, meta)
            return
        hdus = [primary]
        for extname, data in zip(RateArrays.EXTENSIONS, arrays.arrays()):
            hdus.append(fits.ImageHDU(data=np.asarray(data),
                                      header=_extension_header(meta, extname), name=extname))
            if kind == "rateints" and extname == "DQ" and meta.int_times is not None:
                hdus.append(fits.BinTableHDU(data=meta.int_times.data, name="INT_TIMES"))
        fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix")

    try:
        jobs = []
        for kind, arrays, model in (("rate", rate, "ImageModel"), ("rateints", rateints, "CubeModel")):
            path = outputs[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            written.append((Path(name), path))
            jobs.append((kind, arrays, model, Path(name)))
        # the two files at once: much of writing is byte-swapping and file I/O, which
        # release the GIL
        with ThreadPoolExecutor(len(jobs)) as pool:
            for done in [pool.submit(write, *job) for job in jobs]:
                done.result()
        umask = os.umask(0)
        os.umask(umask)
        for tmp, _ in written:  # mkstemp makes 0600 files; products get the usual mode
            os.chmod(tmp, 0o666 & ~umask)
        for tmp, path in written:
            st = os.stat(tmp)
            os.replace(tmp, path)
            if placed is not None:
                placed.append((path, st.st_dev, st.st_ino))
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()


def _extension_header(meta: ExposureMeta, extname: str) -> fits.Header:
    hdr = _sci_header(meta) if extname == "SCI" else fits.Header()
    if extname in ("SCI", "ERR"):
        hdr["BUNIT"] = "DN/s"
    return hdr


def _stream_cube(path: Path, primary: fits.PrimaryHDU, store: CubeStore, meta: ExposureMeta,
                 images: tuple[tuple[str, np.ndarray], ...] = ()) -> None:
    """Write a file extension by extension, the stored ones one integration at a time;
    ``images`` are small in-memory extensions written after the first stored one."""
    fits.HDUList([primary]).writeto(path, overwrite=True, output_verify="silentfix")
    for k, (extname, dtype) in enumerate(store.extensions):
        dtype = np.dtype(dtype)
        bitpix = -8 * dtype.itemsize if dtype.kind == "f" else 8 * dtype.itemsize
        hdr = fits.Header([("XTENSION", "IMAGE"), ("BITPIX", bitpix), ("NAXIS", len(store.shape))])
        for axis, size in enumerate(reversed(store.shape), start=1):
            hdr[f"NAXIS{axis}"] = size
        hdr["PCOUNT"], hdr["GCOUNT"] = 0, 1
        wide_unsigned = dtype.kind == "u" and dtype.itemsize > 1
        if wide_unsigned:  # unsigned integers are stored signed with BZERO, as FITS requires
            hdr["BSCALE"] = 1
            hdr["BZERO"] = 2 ** (8 * dtype.itemsize - 1)
        hdr["EXTNAME"] = extname
        hdr.extend(_extension_header(meta, extname))
        stream = fits.StreamingHDU(str(path), hdr)
        for i in range(store.shape[0]):
            plane = store.plane(k, i)
            if wide_unsigned:
                plane = (plane ^ np.array(hdr["BZERO"], dtype)).view(f"i{dtype.itemsize}")
            stream.write(plane.astype(plane.dtype.newbyteorder(">")))
        stream.close()
        if k == 0:
            for name, data in images:
                fits.append(str(path), data, header=fits.Header([("EXTNAME", name)]))
        if extname == "DQ" and meta.int_times is not None:
            fits.append(str(path), meta.int_times.data, header=fits.Header([("EXTNAME", "INT_TIMES")]))


def write_ramp(meta: ExposureMeta, path: Path, store: CubeStore, pixeldq: np.ndarray,
               keywords: dict[str, object], history: list[str], placed: list | None = None) -> None:
    """The ramp as the band pass hands it to the rate producer (after jump), as a
    RampModel file: SCI, PIXELDQ, GROUPDQ, INT_TIMES."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        primary = fits.PrimaryHDU(header=primary_header(meta, "RampModel", path.name, keywords, history))
        _stream_cube(Path(name), primary, store, meta, images=(("PIXELDQ", pixeldq),))
        if meta.int_times is not None:
            fits.append(name, meta.int_times.data, header=fits.Header([("EXTNAME", "INT_TIMES")]))
        st = os.stat(name)
        os.replace(name, path)
        if placed is not None:
            placed.append((path, st.st_dev, st.st_ino))
    finally:
        if os.path.exists(name):
            os.unlink(name)

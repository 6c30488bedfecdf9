"""Rate products: the arrays a rate-producing step fills, and writing them as
``_rate.fits`` (ImageModel) and ``_rateints.fits`` (CubeModel) that jwst reads as its own.

Files are written to a hidden temporary name in the output directory and renamed into
place, so a reader never sees a partial product.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np
from astropy.io import fits

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
    """Per-integration products ``[nints, ny, nx]`` kept in raw scratch files, so that
    memory does not grow with the number of integrations: each band is written through
    a short-lived memory map, and the product is streamed out one integration at a time."""

    DTYPES = (np.float32, np.float32, np.uint32, np.float32, np.float32)

    def __init__(self, shape: tuple[int, int, int], directory: Path):
        self.shape = shape
        self.paths = []
        for extname, dtype in zip(RateArrays.EXTENSIONS, self.DTYPES):
            path = Path(directory) / f"rateints_{extname.lower()}.raw"
            with open(path, "wb") as f:
                f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
            self.paths.append((path, dtype))

    def put(self, index, other: RateArrays) -> None:
        for (path, dtype), theirs in zip(self.paths, other.arrays()):
            target = np.memmap(path, dtype=dtype, mode="r+", shape=self.shape)
            target[index] = theirs
            target.flush()
            del target

    def plane(self, k: int, i: int) -> np.ndarray:
        path, dtype = self.paths[k]
        source = np.memmap(path, dtype=dtype, mode="r", shape=self.shape)
        out = np.array(source[i])
        del source
        return out


def check_writable(paths: Iterable[Path], overwrite: bool, source: Path) -> None:
    for path in paths:
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
                   history: list[str]) -> None:
    """Write ``outputs['rate']`` and ``outputs['rateints']``: both go to temporary names
    first and are renamed into place only when both are complete."""
    written: list[tuple[Path, Path]] = []
    try:
        for kind, arrays, model in (("rate", rate, "ImageModel"), ("rateints", rateints, "CubeModel")):
            path = outputs[kind]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            written.append((tmp, path))
            primary = fits.PrimaryHDU(header=primary_header(meta, model, path.name, keywords, history))
            if isinstance(arrays, CubeStore):
                _stream_cube(tmp, primary, arrays, meta)
                continue
            hdus = [primary]
            for extname, data in zip(RateArrays.EXTENSIONS, arrays.arrays()):
                hdus.append(fits.ImageHDU(data=np.asarray(data),
                                          header=_extension_header(meta, extname), name=extname))
                if kind == "rateints" and extname == "DQ" and meta.int_times is not None:
                    hdus.append(fits.BinTableHDU(data=meta.int_times.data, name="INT_TIMES"))
            fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix")
        for tmp, path in written:
            os.replace(tmp, path)
    finally:
        for tmp, _ in written:
            if tmp.exists():
                tmp.unlink()


def _extension_header(meta: ExposureMeta, extname: str) -> fits.Header:
    hdr = _sci_header(meta) if extname == "SCI" else fits.Header()
    if extname in ("SCI", "ERR"):
        hdr["BUNIT"] = "DN/s"
    return hdr


def _stream_cube(path: Path, primary: fits.PrimaryHDU, store: CubeStore, meta: ExposureMeta) -> None:
    """Write a rateints file extension by extension, one integration plane at a time."""
    fits.HDUList([primary]).writeto(path, overwrite=True, output_verify="silentfix")
    nints, ny, nx = store.shape
    for k, extname in enumerate(RateArrays.EXTENSIONS):
        is_dq = extname == "DQ"
        hdr = fits.Header([("XTENSION", "IMAGE"), ("BITPIX", 32 if is_dq else -32), ("NAXIS", 3),
                           ("NAXIS1", nx), ("NAXIS2", ny), ("NAXIS3", nints),
                           ("PCOUNT", 0), ("GCOUNT", 1)])
        if is_dq:  # uint32 is stored as int32 with BZERO 2**31, as FITS requires
            hdr["BSCALE"] = 1
            hdr["BZERO"] = 2**31
        hdr["EXTNAME"] = extname
        hdr.extend(_extension_header(meta, extname))
        stream = fits.StreamingHDU(str(path), hdr)
        for i in range(nints):
            plane = store.plane(k, i)
            if is_dq:
                plane = (plane ^ np.uint32(2**31)).view(np.int32)
            stream.write(plane.astype(plane.dtype.newbyteorder(">")))
        stream.close()
        if is_dq and meta.int_times is not None:
            fits.append(str(path), meta.int_times.data, header=fits.Header([("EXTNAME", "INT_TIMES")]))

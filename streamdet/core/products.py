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
    def allocate(cls, shape: tuple[int, ...], directory: Path | None = None) -> "RateArrays":
        """Zeroed arrays; memory-mapped in ``directory`` when given (large rateints)."""
        def make(dtype):
            if directory is None:
                return np.zeros(shape, dtype=dtype)
            fd, name = tempfile.mkstemp(dir=directory, suffix=".npy")
            os.close(fd)
            return np.lib.format.open_memmap(name, mode="w+", dtype=dtype, shape=shape)
        return cls(make(np.float32), make(np.float32), make(np.uint32),
                   make(np.float32), make(np.float32))

    def arrays(self) -> list[np.ndarray]:
        return [getattr(self, f.name) for f in fields(self)]

    def put(self, index, other: "RateArrays") -> None:
        for mine, theirs in zip(self.arrays(), other.arrays()):
            mine[index] = theirs


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
                   rateints: RateArrays, keywords: dict[str, object], history: list[str]) -> None:
    """Write ``outputs['rate']`` and ``outputs['rateints']`` atomically."""
    for kind, arrays, model in (("rate", rate, "ImageModel"), ("rateints", rateints, "CubeModel")):
        path = outputs[kind]
        hdus = [fits.PrimaryHDU(header=primary_header(meta, model, path.name, keywords, history))]
        for extname, data in zip(RateArrays.EXTENSIONS, arrays.arrays()):
            hdr = _sci_header(meta) if extname == "SCI" else fits.Header()
            hdu = fits.ImageHDU(data=np.asarray(data), header=hdr, name=extname)
            if extname in ("SCI", "ERR"):
                hdu.header["BUNIT"] = "DN/s"
            hdus.append(hdu)
            if kind == "rateints" and extname == "DQ" and meta.int_times is not None:
                hdus.append(fits.BinTableHDU(data=meta.int_times.data, name="INT_TIMES"))
        atomic_write(fits.HDUList(hdus), path)


def atomic_write(hdul: fits.HDUList, path: Path) -> None:
    """Write to a temporary name beside ``path`` and rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True, output_verify="silentfix")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

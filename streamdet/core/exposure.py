"""Reading a Level 1B MIRI exposure lazily: the header becomes :class:`ExposureMeta`,
SCI is read one integration (or one band of rows) at a time with positioned reads.

Level 1B SCI is stored as big-endian int16 with BZERO=32768: the raw integers are read
and the zero point applied while converting to float32, one slab at a time.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet._ckernels import declare, ptr

from .buffers import ThreadBuffers
from .errors import BadInputError

_int16_to_float32 = declare("convert", "streamdet_float32_from_big_endian_int16", "ppiffii")

#: MIRI full-frame size (rows, columns)
FULL_SHAPE = (1024, 1032)

_REQUIRED = ("NINTS", "NGROUPS", "NFRAMES", "TFRAME", "TGROUP", "READPATT")


@dataclass
class ExposureMeta:
    """The header values the steps and products need."""

    path: Path
    header: fits.Header
    nints: int            # integrations in this file
    ngroups: int
    ny: int
    nx: int
    nframes: int
    groupgap: int
    drop_frames1: int
    frame_time: float
    group_time: float
    readpatt: str
    subarray: str
    substrt1: int         # 1-based first column of the subarray on the full frame
    substrt2: int         # 1-based first row
    instrument: str
    detector: str
    exp_type: str
    intstart: int         # 1-based absolute number of this file's first integration
    nints_total: int      # NINTS of the whole exposure (segmented files hold a part)
    int_times: fits.BinTableHDU | None = None
    extra: dict = field(default_factory=dict)
    #: exposure-level values one step leaves for later ones, as jwst keeps them on the
    #: model (``average_dark_current`` from dark_current for ramp_fit, for instance)
    state: dict = field(default_factory=dict)

    @property
    def int_index(self) -> np.ndarray:
        """0-based absolute integration numbers of this file's integrations."""
        return np.arange(self.nints) + (self.intstart - 1)

    @property
    def is_full_frame(self) -> bool:
        return (self.ny, self.nx) == FULL_SHAPE

    @property
    def base_name(self) -> str:
        """Product base name: the file name without ``_uncal.fits`` (or its suffix)."""
        return product_base_name(self.path)


#: file-name endings of the inputs streamdet takes: Level 1B, and ramps jwst or streamdet
#: saved (``_ramp.fits``, or after a step: ``_jump.fits``, ``_dark_current.fits``...)
_PRODUCT_SUFFIXES = ("_uncal.fits", "_ramp.fits") + tuple(
    f"_{step}.fits" for step in ("dq_init", "saturation", "firstframe", "lastframe", "reset",
                                 "linearity", "rscd", "dark_current", "refpix", "jump",
                                 "group_scale", "emicorr", "ipc", "charge_migration",
                                 "picture_frame", "clean_flicker_noise", "persistence")
) + (".fits.gz", ".fits")


def product_base_name(path: str | os.PathLike) -> str:
    """The base name of the products of the exposure file ``path`` (known without
    opening it): the file name without ``_uncal.fits`` (or its suffix)."""
    path = Path(path)
    name = path.name
    for suffix in _PRODUCT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _bad(path, message: str) -> BadInputError:
    return BadInputError(f"{path}: {message}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _blank_tail(path: Path, start: int, fd: int | None = None) -> bool:
    """True if the bytes of ``path`` (or of the open ``fd``) from ``start`` on are only
    zeros or blanks (padding some writers leave after the last HDU)."""
    with open(path if fd is None else os.dup(fd), "rb") as f:
        f.seek(start)
        while block := f.read(1 << 20):
            if block.strip(b"\0 "):
                return False
    return True


def _int(path, hdr: fits.Header, key: str, default: int | None = None) -> int:
    """Integer keyword ``key`` (``default`` when absent or blank), or a one-line error."""
    value = hdr.get(key, default)
    if value is None or (isinstance(value, str) and not value.strip()):
        if default is None:
            raise _bad(path, f"missing keyword {key}")
        value = default
    try:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise _bad(path, f"keyword {key}={value!r} is not an integer") from None


def _float(path, hdr: fits.Header, key: str) -> float:
    value = hdr[key]
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise _bad(path, f"keyword {key}={value!r} is not a number") from None


class Exposure:
    """An open Level 1B file. Use as a context manager.

    ``fd``: an open descriptor of the file (the watch daemon's workers open and check an
    inbox entry first); every byte is then read through it, ``path`` only names it."""

    def __init__(self, path: str | os.PathLike, fd: int | None = None):
        self.path = Path(path)
        self._source_fd = fd
        self._fileobj = None
        self._buffers = ThreadBuffers()  # each thread's SCI read buffer
        if fd is None and not self.path.exists():
            raise _bad(self.path, "no such file")
        if fd is None and self.path.is_dir():
            raise _bad(self.path, "is a directory, not a FITS file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if fd is not None:
                    self._fileobj = os.fdopen(os.dup(fd), "rb")
                self._hdul = fits.open(self._fileobj or self.path, memmap=True,
                                       do_not_scale_image_data=True, lazy_load_hdus=False)
        except PermissionError:
            raise _bad(self.path, "cannot be read (permission denied)") from None
        except Exception as exc:  # astropy raises many kinds of errors on non-FITS bytes
            raise _bad(self.path, f"not a readable FITS file ({_one_line(exc)})") from None
        try:
            self._check_extent()
            self.meta = self._read_meta()
            self._sci = self._hdul["SCI"]
            self._check_data_present()
        except BaseException:
            self.close()
            raise

    # -- structure ------------------------------------------------------------------------
    def _size(self) -> int:
        if self._source_fd is not None:
            return os.fstat(self._source_fd).st_size
        return os.path.getsize(self.path)

    def _check_extent(self) -> None:
        """The file must end where its last HDU's header says it does: astropy quietly
        drops an extension whose header was cut off and maps data that is not there."""
        have = self._size()
        if not len(self._hdul):
            raise _bad(self.path, "not a readable FITS file (no HDU)")
        last = self._hdul[-1]
        try:
            info = last.fileinfo()
            need = info["datLoc"] + info["datSpan"]
        except Exception:  # pragma: no cover - astropy always knows where an HDU it read is
            return
        if have < need:
            raise _bad(self.path, f"is truncated: its headers describe {need} bytes, "
                                  f"the file has {have}")
        if have > need and not _blank_tail(self.path, need, self._source_fd):
            raise _bad(self.path, f"is truncated or damaged: {have - need} bytes after the last "
                                  f"complete extension ({last.name or 'PRIMARY'}) are not a "
                                  "readable FITS extension")

    # -- header ---------------------------------------------------------------------------
    def _read_meta(self) -> ExposureMeta:
        p = self.path
        if "SCI" not in self._hdul:
            raise _bad(p, "has no SCI extension (not a Level 1B exposure)")
        hdr = self._hdul[0].header
        sci = self._hdul["SCI"]
        instrument = str(hdr.get("INSTRUME", "")).strip().upper()
        if not instrument:
            raise _bad(p, "missing keyword INSTRUME")
        if instrument != "MIRI":
            raise _bad(p, f"INSTRUME is {instrument!r}; streamdet processes MIRI exposures only")
        missing = [k for k in _REQUIRED if k not in hdr]
        if missing:
            raise _bad(p, f"missing keyword{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        shape = sci.shape
        if len(shape) != 4:
            raise _bad(p, f"SCI has {len(shape)} dimensions {tuple(shape)}; expected 4 "
                          "[nints, ngroups, ny, nx]")
        bitpix = sci.header.get("BITPIX")
        # a partly calibrated ramp (RampModel, e.g. a saved _jump.fits) holds float32 DN
        is_ramp = str(hdr.get("DATAMODL", "")).strip() == "RampModel"
        if is_ramp and bitpix != -32:
            raise _bad(p, f"a RampModel's SCI must hold 32-bit floats, not BITPIX={bitpix}")
        if bitpix != 16 and not is_ramp:
            kind = {8: "8-bit integers", 32: "32-bit integers", 64: "64-bit integers",
                    -32: "32-bit floats", -64: "64-bit floats"}.get(bitpix, "an unknown type")
            raise _bad(p, f"SCI holds {kind} (BITPIX={bitpix}); a Level 1B ramp is 16-bit "
                          "unsigned integers")
        nints, ngroups, ny, nx = shape
        ngroups_hdr = _int(p, hdr, "NGROUPS")
        nints_total = _int(p, hdr, "NINTS")
        nframes = _int(p, hdr, "NFRAMES")
        frame_time = _float(p, hdr, "TFRAME")
        group_time = _float(p, hdr, "TGROUP")
        if ngroups != ngroups_hdr:
            raise _bad(p, f"SCI has {ngroups} groups but NGROUPS={ngroups_hdr}")
        intstart = _int(p, hdr, "INTSTART", 1) or 1
        intend = _int(p, hdr, "INTEND", intstart + nints - 1) or intstart + nints - 1
        if intend - intstart + 1 != nints:
            raise _bad(p, f"SCI has {nints} integrations but INTSTART..INTEND is "
                          f"{intstart}..{intend}")
        if nints_total < intend:
            raise _bad(p, f"INTEND={intend} exceeds NINTS={nints_total}")
        if ngroups < 1 or nints < 1:
            raise _bad(p, "SCI is empty")
        substrt1 = _int(p, hdr, "SUBSTRT1", 1)
        substrt2 = _int(p, hdr, "SUBSTRT2", 1)
        subsize1 = _int(p, hdr, "SUBSIZE1", nx)
        subsize2 = _int(p, hdr, "SUBSIZE2", ny)
        if (subsize2, subsize1) != (ny, nx):
            raise _bad(p, f"SCI frame is {ny}x{nx} but SUBSIZE2xSUBSIZE1 is {subsize2}x{subsize1}")
        int_times = self._hdul["INT_TIMES"] if "INT_TIMES" in self._hdul else None
        return ExposureMeta(
            path=p, header=hdr, nints=nints, ngroups=ngroups, ny=ny, nx=nx,
            nframes=nframes, groupgap=_int(p, hdr, "GROUPGAP", 0),
            drop_frames1=_int(p, hdr, "DRPFRMS1", 0),
            frame_time=frame_time, group_time=group_time,
            readpatt=str(hdr["READPATT"]).strip().upper(),
            subarray=str(hdr.get("SUBARRAY", "FULL")).strip().upper(),
            substrt1=substrt1, substrt2=substrt2,
            instrument=instrument, detector=str(hdr.get("DETECTOR", "")).strip().upper(),
            exp_type=str(hdr.get("EXP_TYPE", "")).strip().upper(),
            intstart=intstart, nints_total=nints_total, int_times=int_times,
            extra={"sci_header": sci.header,
                   "group": self._hdul["GROUP"] if "GROUP" in self._hdul else None,
                   "avdrkcur": (np.array(self._hdul["AVDRKCUR"].data, np.float32)
                                if is_ramp and "AVDRKCUR" in self._hdul
                                and self._hdul["AVDRKCUR"].data is not None else None),
                   # a saved ramp's metadata tree (its provenance goes on with it)
                   "asdf": (bytes(self._hdul["ASDF"].data[0][0]) if is_ramp
                            and "ASDF" in self._hdul else None)},
        )

    def _check_data_present(self) -> None:
        info = self._sci.fileinfo()
        need = info["datLoc"] + self._sci.size  # size is in bytes
        have = self._size()
        if have < need:
            raise _bad(self.path, f"is truncated: SCI needs {need} bytes, the file has {have}")
        try:
            raw = self._sci.data
        except Exception as exc:  # astropy raises various errors on damaged data
            raise _bad(self.path, f"SCI data cannot be read ({exc})") from None
        self._raw = raw
        # SCI (16-bit, 4-D: checked above) is read with positioned reads: a memory map would
        # take page faults for every piece and keep them in the resident set. A
        # tile-compressed SCI is what astropy decompressed into memory.
        self._sci_offset = None if isinstance(self._sci, fits.CompImageHDU) else info["datLoc"]
        # opened now, like the map: the run reads the file it checked even if the path is
        # then removed or replaced (a re-delivery renamed over it)
        self._fd: int | None = None
        if self._sci_offset is not None:
            self._fd = (os.dup(self._source_fd) if self._source_fd is not None else
                        os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        self._bzero = float(self._sci.header.get("BZERO", 0.0))
        self._bscale = float(self._sci.header.get("BSCALE", 1.0))
        self._groupdq = self._hdul["GROUPDQ"].data if "GROUPDQ" in self._hdul else None
        if self._groupdq is not None and self._groupdq.shape != self._raw.shape:
            raise _bad(self.path, f"GROUPDQ shape {self._groupdq.shape} differs from SCI {self._raw.shape}")
        self._pixeldq = self._hdul["PIXELDQ"].data if "PIXELDQ" in self._hdul else None
        if self._pixeldq is not None and self._pixeldq.shape != (self.meta.ny, self.meta.nx):
            raise _bad(self.path, f"PIXELDQ shape {self._pixeldq.shape} differs from the frame")

    # -- data -----------------------------------------------------------------------------
    def _to_float(self, raw: np.ndarray, out: np.ndarray) -> None:
        """Stored 16-bit SCI values into float32 DN ``out`` (contiguous, same shape)."""
        if raw.dtype.kind == "f":  # a saved ramp: float DN already
            out[...] = raw
            return
        if raw.dtype != np.dtype(">i2") or not raw.flags.c_contiguous:
            raw = np.ascontiguousarray(raw, dtype=">i2")
        _int16_to_float32(ptr(raw), ptr(out), raw.size, self._bscale, self._bzero,
                          self._bscale != 1.0, self._bzero != 0.0)

    def _read_sci(self, ints: slice, rows: slice) -> np.ndarray:
        """SCI of integrations ``ints`` and rows ``rows``, as stored (big-endian 16-bit),
        in this thread's read buffer (valid until its next read)."""
        nints, ngroups, ny, nx = self._raw.shape
        i0, i1, istep = ints.indices(nints)
        r0, r1, rstep = rows.indices(ny)
        if self._sci_offset is None or istep != 1 or rstep != 1:
            return self._raw[ints, :, rows, :]
        out = self._buffers.get("sci", (max(0, i1 - i0), ngroups, max(0, r1 - r0), nx),
                                self._raw.dtype)
        if out.size == 0:
            return out
        item = self._raw.dtype.itemsize
        plane_bytes = ny * nx * item
        want = out[0, 0].nbytes
        for k, i in enumerate(range(i0, i1)):
            for g in range(ngroups):
                at = self._sci_offset + (i * ngroups + g) * plane_bytes + r0 * nx * item
                got = os.preadv(self._fd, [out[k, g]], at)
                if got != want:
                    raise _bad(self.path, f"SCI data ends early (integration {i + 1}, group "
                                          f"{g + 1}: {got} of {want} bytes)")
        return out

    def read(self, ints: slice, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Data (float32 DN) and groupdq (uint8) of integrations ``ints`` (file-local) and
        rows ``rows``, each ``[nints, ngroups, nrows, nx]``."""
        nints, ngroups, ny, nx = self._raw.shape
        shape = (len(range(*ints.indices(nints))), ngroups, len(range(*rows.indices(ny))), nx)
        data, groupdq = np.empty(shape, np.float32), np.empty(shape, np.uint8)
        self.read_into(ints, rows, data, groupdq)
        return data, groupdq

    def read_into(self, ints: slice, rows: slice, data: np.ndarray, groupdq: np.ndarray) -> None:
        """:meth:`read` into the caller's contiguous arrays (reused buffers spare the page
        faults of fresh memory)."""
        self._to_float(self._read_sci(ints, rows), data)
        if self._groupdq is not None:
            groupdq[...] = self._groupdq[ints, :, rows, :]
        else:
            groupdq.fill(0)

    def drop_buffers(self) -> None:
        """Free the threads' SCI read buffers (reading is over)."""
        self._buffers.drop()

    def initial_pixeldq(self) -> np.ndarray:
        if self._pixeldq is not None:
            # read unscaled: uint32 is stored as int32 with BZERO = 2**31
            bzero = int(self._hdul["PIXELDQ"].header.get("BZERO", 0) or 0)
            return (np.asarray(self._pixeldq).astype(np.int64) + bzero).astype(np.uint32)
        return np.zeros((self.meta.ny, self.meta.nx), dtype=np.uint32)

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None
        self._raw = None
        self._groupdq = self._pixeldq = None
        try:
            self._hdul.close()
        except Exception:
            pass
        if getattr(self, "_fileobj", None) is not None:
            self._fileobj.close()
            self._fileobj = None

    def __enter__(self) -> "Exposure":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SEGMENT_RE = re.compile(r"-seg(\d{3})")

"""Reading a Level 1B MIRI exposure lazily: the header becomes :class:`ExposureMeta`,
SCI is read one integration (or one band of rows) at a time with positioned reads.

Level 1B SCI is stored as big-endian int16 with BZERO=32768: the raw integers are read
and the zero point applied while converting to float32, one slab at a time.
"""

from __future__ import annotations

import math
import os
import re
import stat
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.io import fits

from streamdet._ckernels import pointer
from streamdet._ckernels._convert import ffi as _convert_ffi, lib as _convert
from streamdet._ckernels._scratch import ffi as _io_ffi, lib as _io

from .buffers import ThreadBuffers
from .errors import BadInputError, InputWarning, shown
from .step import ExposureState

#: MIRI full-frame size (rows, columns)
FULL_SHAPE = (1024, 1032)

_REQUIRED = ("NINTS", "NGROUPS", "NFRAMES", "TFRAME", "TGROUP", "READPATT")

#: frames averaged into one group, and frames dropped between groups, beyond which a
#: header is nonsense rather than a MIRI read pattern (MIRI averages at most 64 frames)
MAX_FRAMES_PER_GROUP = 256

#: the first bytes of compressed files, which are not FITS until decompressed
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"PK\x03\x04", "zip"),
               (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


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
    #: exposure-level values one step leaves for later ones (see ExposureState)
    state: ExposureState = field(default_factory=ExposureState)

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
    return BadInputError(f"{shown(path)}: {message}")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _blank_tail(fd: int, start: int) -> bool:
    """True if the bytes of the open file ``fd`` from ``start`` on are only zeros or
    blanks (padding some writers leave after the last HDU)."""
    while block := os.pread(fd, 1 << 20, start):
        if block.strip(b"\0 "):
            return False
        start += len(block)
    return True


def _raised_in_astropy(exc: BaseException) -> bool:
    """True if ``exc`` was raised inside astropy (called from streamdet's last frame on),
    not by streamdet's own code."""
    import traceback

    files = [frame.filename for frame in traceback.extract_tb(exc.__traceback__)]
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    last_ours = max((i for i, f in enumerate(files) if os.path.abspath(f).startswith(ours)),
                    default=-1)
    return any(f"{os.sep}astropy{os.sep}" in f for f in files[last_ours + 1:])


def _has_end_card(fd: int, size: int, limit: int = 1 << 20) -> bool:
    """True if the first header of the open file ``fd`` ends (an END card on a card
    boundary within its first ``limit`` bytes)."""
    head = os.pread(fd, min(size, limit), 0)
    return any(head[i:i + 80].rstrip(b" ") == b"END" for i in range(0, len(head) - 79, 80))


def _check_cards(path, extname: str, hdr: fits.Header) -> list[int]:
    """Every card of ``hdr`` must be one the products can carry (they copy the input's
    metadata): astropy would refuse an unfixable card only when writing, after the work.
    Returns the indices of the cards that follow no FITS convention astropy knows (it
    warns about each whenever it is copied)."""
    unknown = []
    for number, card in enumerate(hdr.cards, start=1):
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            image = card.image
            fits.Card.fromstring(image).keyword
        if warned or not (image.isascii() and image.isprintable()):
            unknown.append(number - 1)  # (FITS headers are printable ASCII, or unwritable)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                card.verify("silentfix+exception")
        except Exception as exc:
            reason = _one_line(exc)
            for noise in ("Verification reported errors:", "Unfixable error:",
                          "Note: astropy.io.fits uses zero-based indexing."):
                reason = reason.replace(noise, "")
            raise _bad(path, f"{extname} header card {number} is damaged: "
                             f"{' '.join(reason.split())}") from None
    return unknown


def _without_unknown_cards(path, hdr: fits.Header, extname: str = "primary") -> fits.Header:
    """The header without the cards astropy cannot interpret or write, said once in one
    line (rather than astropy's two-line warning each time the header is copied, or its
    refusal to write the products after all the work)."""
    unknown = _check_cards(path, extname, hdr)
    if not unknown:
        return hdr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdr = hdr.copy()
        keys = [shown(hdr.cards[i].image[:8].rstrip()) for i in unknown]
        for i in reversed(unknown):
            del hdr[i]
    several = len(unknown) > 1
    warnings.warn(InputWarning(
        f"{shown(path)}: {len(unknown)} {extname} header card{'s' if several else ''} that "
        f"follow{'' if several else 's'} no FITS convention left out of the products "
        f"({', '.join(keys)})"))
    return hdr


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
        if isinstance(value, (bool, complex)):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise _bad(path, f"keyword {key}={value!r} is not a number") from None
    if not math.isfinite(number):
        raise _bad(path, f"keyword {key}={value!r} is not a finite number")
    return number


def _in_range(path, key: str, value: float, low: float, high: float, unit: str) -> None:
    """A one-line error unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise _bad(path, f"keyword {key}={value!r} is out of range: it must be within "
                         f"{low}..{high} {unit}")


def _positive(path, key: str, value: float, unit: str) -> None:
    if not value > 0:
        raise _bad(path, f"keyword {key}={value!r} is out of range: it must be a positive "
                         f"number of {unit}")


def _text(path, hdr: fits.Header, key: str, default: str | None = None) -> str:
    """String keyword ``key`` upper-cased (``default`` when absent), or a one-line error."""
    if key not in hdr:
        if default is None:
            raise _bad(path, f"missing keyword {key}")
        return default
    value = hdr[key]
    if isinstance(value, str) and not value.strip() and default is not None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise _bad(path, f"keyword {key}={value!r} is not a text value")
    return value.strip().upper()


class Exposure:
    """An open Level 1B file. Use as a context manager.

    ``fd``: an open descriptor of the file (the watch daemon's workers open and check an
    inbox entry first); every byte is then read through it, ``path`` only names it."""

    def __init__(self, path: str | os.PathLike, fd: int | None = None):
        self.path = Path(path)
        self._buffers = ThreadBuffers()  # each thread's SCI read buffer
        self._fd: int | None = None
        # opened once, and everything is read through this descriptor: the run reads the
        # file it checked even if the path is then removed or replaced (a re-delivery
        # renamed over it). Non-blocking, so that a FIFO without a writer cannot hang the
        # open. A descriptor the caller opened and checked (the daemon's) is used as is.
        try:
            if fd is not None:
                self._fd = os.dup(fd)
            else:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK
                                   | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise _bad(self.path, "no such file") from None
        except PermissionError:
            raise _bad(self.path, "cannot be read (permission denied)") from None
        except OSError as exc:
            raise _bad(self.path, f"cannot be opened ({exc.strerror})") from None
        try:
            self._open_fits()
            self._check_extent()
            self.meta = self._read_meta()
            self._sci = self._hdul["SCI"]
            self._check_data_present()
        except BadInputError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            if _raised_in_astropy(exc):  # astropy choking on the file's bytes: the file's fault
                raise _bad(self.path, f"is a damaged FITS file ({_one_line(exc)})") from None
            raise
        except BaseException:
            self.close()
            raise

    def _open_fits(self) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would be read forever
            raise _bad(self.path, f"is {_file_kind(st.st_mode)}, not a regular file")
        self._size = st.st_size
        os.set_blocking(self._fd, True)
        magic = os.pread(self._fd, 80, 0)
        for start, kind in _COMPRESSED:
            if magic.startswith(start):
                raise _bad(self.path, f"is {kind}-compressed, not a FITS file: decompress it "
                                      "first (streamdet reads uncompressed FITS, and "
                                      "tile-compressed FITS extensions)")
        stream = os.fdopen(os.dup(self._fd), "rb")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._hdul = fits.open(stream, memmap=True, do_not_scale_image_data=True,
                                       lazy_load_hdus=False)
        except Exception as exc:  # astropy raises many kinds of errors on non-FITS bytes
            stream.close()
            if magic.startswith(b"SIMPLE  =") and not _has_end_card(self._fd, self._size):
                raise _bad(self.path, f"is truncated: its {self._size} bytes end inside the "
                                      "primary header") from None
            raise _bad(self.path, f"not a readable FITS file ({_one_line(exc)})") from None

    # -- structure ------------------------------------------------------------------------
    def _check_extent(self) -> None:
        """The file must end where its last HDU's header says it does: astropy quietly
        drops an extension whose header was cut off and maps data that is not there."""
        have = self._size
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
        if have > need and not _blank_tail(self._fd, need):
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
        if not isinstance(sci, (fits.ImageHDU, fits.CompImageHDU)):
            raise _bad(p, f"the SCI extension is not an image (XTENSION="
                          f"{sci.header.get('XTENSION')!r}, read as {type(sci).__name__})")
        hdr = _without_unknown_cards(p, hdr)
        sci_header = _without_unknown_cards(p, sci.header, "SCI")
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
        if ngroups < 1 or nints < 1 or ny < 1 or nx < 1:
            raise _bad(p, f"SCI is empty (shape {tuple(shape)})")
        # every header value a step computes with is checked here, once: a zero time or
        # frame count would divide by zero deep in a step, a negative one give nonsense
        ngroups_hdr = _int(p, hdr, "NGROUPS")
        if ngroups != ngroups_hdr:
            raise _bad(p, f"SCI has {ngroups} groups but NGROUPS={ngroups_hdr}")
        nints_total = _int(p, hdr, "NINTS")
        nframes = _int(p, hdr, "NFRAMES")
        _in_range(p, "NFRAMES", nframes, 1, MAX_FRAMES_PER_GROUP, "frames")
        groupgap = _int(p, hdr, "GROUPGAP", 0)
        _in_range(p, "GROUPGAP", groupgap, 0, MAX_FRAMES_PER_GROUP, "frames")
        drop_frames1 = _int(p, hdr, "DRPFRMS1", 0)
        _in_range(p, "DRPFRMS1", drop_frames1, 0, MAX_FRAMES_PER_GROUP, "frames")
        if "FRMDIVSR" in hdr:  # the divisor of the frames summed into a group
            _in_range(p, "FRMDIVSR", _int(p, hdr, "FRMDIVSR"), 1, MAX_FRAMES_PER_GROUP, "frames")
        frame_time = _float(p, hdr, "TFRAME")
        group_time = _float(p, hdr, "TGROUP")
        _positive(p, "TFRAME", frame_time, "seconds")
        _positive(p, "TGROUP", group_time, "seconds")
        intstart = _int(p, hdr, "INTSTART", 1)
        if intstart < 1:
            raise _bad(p, f"keyword INTSTART={intstart} is out of range: integrations count from 1")
        intend = _int(p, hdr, "INTEND", intstart + nints - 1)
        if intend - intstart + 1 != nints:
            raise _bad(p, f"SCI has {nints} integrations but INTSTART..INTEND is "
                          f"{intstart}..{intend}")
        if nints_total < intend:
            raise _bad(p, f"INTEND={intend} exceeds NINTS={nints_total}")
        substrt1 = _int(p, hdr, "SUBSTRT1", 1)
        substrt2 = _int(p, hdr, "SUBSTRT2", 1)
        subsize1 = _int(p, hdr, "SUBSIZE1", nx)
        subsize2 = _int(p, hdr, "SUBSIZE2", ny)
        if (subsize2, subsize1) != (ny, nx):
            raise _bad(p, f"SCI frame is {ny}x{nx} but SUBSIZE2xSUBSIZE1 is {subsize2}x{subsize1}")
        full_ny, full_nx = FULL_SHAPE
        if not (1 <= substrt1 <= full_nx - nx + 1 and 1 <= substrt2 <= full_ny - ny + 1):
            raise _bad(p, f"the {ny}x{nx} frame at SUBSTRT1={substrt1}, SUBSTRT2={substrt2} "
                          f"does not lie inside the {full_ny}x{full_nx} detector")
        for name in ("INT_TIMES", "GROUP"):  # copied into the products: they must be tables
            table = self._hdul[name] if name in self._hdul else None
            if table is None:
                continue
            try:
                if not isinstance(table, fits.BinTableHDU):
                    raise ValueError(f"it is a {type(table).__name__.strip('_')}, not a binary table")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    len(table.data) if table.data is not None else None
            except Exception as exc:
                raise _bad(p, f"the {name} extension cannot be read ({_one_line(exc)})") from None
        int_times = self._hdul["INT_TIMES"] if "INT_TIMES" in self._hdul else None
        return ExposureMeta(
            path=p, header=hdr, nints=nints, ngroups=ngroups, ny=ny, nx=nx,
            nframes=nframes, groupgap=groupgap, drop_frames1=drop_frames1,
            frame_time=frame_time, group_time=group_time,
            readpatt=_text(p, hdr, "READPATT"),
            subarray=_text(p, hdr, "SUBARRAY", "FULL"),
            substrt1=substrt1, substrt2=substrt2,
            instrument=instrument, detector=_text(p, hdr, "DETECTOR", ""),
            exp_type=_text(p, hdr, "EXP_TYPE", ""),
            intstart=intstart, nints_total=nints_total, int_times=int_times,
            extra={"sci_header": sci_header,
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
        compressed = isinstance(self._sci, fits.CompImageHDU)
        # a tile-compressed SCI is a table of compressed tiles: its span is what is stored
        need = info["datLoc"] + (info["datSpan"] if compressed else self._sci.size)
        have = self._size
        if have < need:
            raise _bad(self.path, f"is truncated: SCI needs {need} bytes, the file has {have}")
        try:
            # SCI (16-bit, 4-D: checked above) is read with positioned reads: a memory map
            # would take page faults for every piece and keep them in the resident set. A
            # tile-compressed SCI is read through astropy's section, which decompresses
            # only the tiles a piece needs (one file position: one reader at a time).
            raw = self._sci.section if compressed else self._sci.data
            self._raw_shape = tuple(raw.shape)
            if compressed:  # damaged tiles are found now, not halfway through the run
                raw[0:1, 0:1, 0:1, :]
        except Exception as exc:  # astropy raises various errors on damaged data
            raise _bad(self.path, f"SCI data cannot be read ({_one_line(exc)})") from None
        self._raw = raw
        self._sci_offset = None if compressed else info["datLoc"]
        self._section_lock = threading.Lock()
        sci_header = self._sci.header
        self._bzero = _float(self.path, sci_header, "BZERO") if "BZERO" in sci_header else 0.0
        self._bscale = _float(self.path, sci_header, "BSCALE") if "BSCALE" in sci_header else 1.0
        if self._bscale == 0:
            raise _bad(self.path, "SCI keyword BSCALE=0 would make every value the same")
        self._groupdq = self._hdul["GROUPDQ"].data if "GROUPDQ" in self._hdul else None
        if self._groupdq is not None and self._groupdq.shape != self._raw_shape:
            raise _bad(self.path, f"GROUPDQ shape {self._groupdq.shape} differs from SCI {self._raw_shape}")
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
        _convert.streamdet_float32_from_big_endian_int16(
            pointer(_convert_ffi, raw.view(np.uint16)), pointer(_convert_ffi, out), raw.size,
            self._bscale, self._bzero, self._bscale != 1.0, self._bzero != 0.0)

    def _read_sci(self, ints: slice, rows: slice) -> np.ndarray:
        """SCI of integrations ``ints`` and rows ``rows``, as stored (big-endian 16-bit),
        in this thread's read buffer (valid until its next read)."""
        nints, ngroups, ny, nx = self._raw_shape
        i0, i1, istep = ints.indices(nints)
        r0, r1, rstep = rows.indices(ny)
        if self._sci_offset is None or istep != 1 or rstep != 1:
            with self._section_lock:
                try:
                    return self._raw[ints, :, rows, :]
                except Exception as exc:  # a damaged tile of a compressed SCI
                    raise _bad(self.path, f"SCI data cannot be read ({_one_line(exc)})") from None
        out = self._buffers.get("sci", (max(0, i1 - i0), ngroups, max(0, r1 - r0), nx),
                                self._raw.dtype)
        if out.size == 0:
            return out
        item = self._raw.dtype.itemsize
        plane_bytes = ny * nx * item
        for k, i in enumerate(range(i0, i1)):
            # the band's rows of each group plane: one C call per integration (no
            # Python between the reads, and no GIL held)
            at = self._sci_offset + i * ngroups * plane_bytes + r0 * nx * item
            done = _io.streamdet_read_spans(self._fd, pointer(_io_ffi, out[k].view(np.uint16)),
                                             at, plane_bytes, ngroups, out[k, 0].nbytes)
            if done < 0:
                raise OSError(-done, os.strerror(-done), str(self.path))
            if done != ngroups:
                raise _bad(self.path, f"SCI data ends early (integration {i + 1}, group "
                                      f"{done + 1} of {ngroups})")
        return out

    def read(self, ints: slice, rows: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """Data (float32 DN) and groupdq (uint8) of integrations ``ints`` (file-local) and
        rows ``rows``, each ``[nints, ngroups, nrows, nx]``."""
        nints, ngroups, ny, nx = self._raw_shape
        shape = (len(range(*ints.indices(nints))), ngroups, len(range(*rows.indices(ny))), nx)
        data, groupdq = np.empty(shape, np.float32), np.empty(shape, np.uint8)
        self.read_into(ints, rows, data, groupdq)
        return data, groupdq

    def read_into(self, ints: slice, rows: slice, data: np.ndarray, groupdq: np.ndarray,
                  columns: np.ndarray | None = None) -> None:
        """:meth:`read` into the caller's contiguous arrays (reused buffers spare the page
        faults of fresh memory); ``columns``: those columns only (the rows are read
        whole, only those columns converted)."""
        raw = self._read_sci(ints, rows)
        self._to_float(raw if columns is None else raw[..., columns], data)
        if self._groupdq is not None:
            stored = self._groupdq[ints, :, rows, :]
            groupdq[...] = stored if columns is None else stored[..., columns]
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

    def __enter__(self) -> "Exposure":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SEGMENT_RE = re.compile(r"-seg(\d{3})")

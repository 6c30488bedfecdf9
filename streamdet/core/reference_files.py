"""Reading reference files: the arrays of the references resolved for one exposure
(:mod:`streamdet.core.references` decides which files those are).

Arrays are read with positioned reads (or memory-mapped) and cut to the exposure's
subarray on demand; shapes are checked against the exposure with one-line errors naming
the file; scaled DQ arrays are decoded through their DQ_DEF table.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import TYPE_CHECKING

import numpy as np
from astropy.io import fits

from streamdet._ckernels import pointer
from streamdet._ckernels._convert import ffi as _convert_ffi, lib as _convert

from . import dqflags
from .buffers import ThreadBuffers, read_at
from .errors import ReferenceError_
from .fits_unsigned import bzero as offset_of, from_stored, offset_signed
from .exposure import ExposureMeta

if TYPE_CHECKING:
    from .references import Resolved


#: converted reference blocks kept for reuse (see :meth:`References.block`), at most
CACHE_BYTES = 64 * 1024**2

_FLOAT_BITPIX = {-32: np.float32, -64: np.float64, 8: np.uint8, 16: np.int16, 32: np.int32,
                 64: np.int64}


class References:
    """Lazy access to the resolved reference files of one exposure."""

    def __init__(self, meta: ExposureMeta, resolved: dict[str, Resolved],
                 cache_bytes: int = CACHE_BYTES):
        self.meta = meta
        self.resolved = resolved
        self._open: dict[str, fits.HDUList] = {}
        self._checked: set[tuple] = set()  # (reftype, extname, layout) found as expected
        self._fds: dict[str, int] = {}
        self._cache: dict[tuple, np.ndarray] = {}
        self._cache_left = cache_bytes
        self._lock = threading.Lock()
        self._buffers = ThreadBuffers()  # each thread's read buffer and transient block

    def path(self, reftype: str) -> str | None:
        return self.resolved[reftype].path

    def hdul(self, reftype: str) -> fits.HDUList:
        if reftype not in self._open:
            path = self.path(reftype)
            if path is None:
                raise ReferenceError_(f"{self.meta.path}: reference {reftype!r} is N/A")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self._open[reftype] = fits.open(path, memmap=True)
            except (OSError, ValueError) as exc:
                raise ReferenceError_(f"{path}: {reftype} reference is not readable FITS ({exc})") from None
        return self._open[reftype]

    def header(self, reftype: str, ext: int | str = 0) -> fits.Header:
        return self.hdul(reftype)[ext].header

    def has(self, reftype: str, extname: str) -> bool:
        return extname in self.hdul(reftype)

    def raw(self, reftype: str, extname: str):
        return self._hdu(reftype, extname).data

    def _hdu(self, reftype: str, extname: str):
        hdul = self.hdul(reftype)
        if extname not in hdul:
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} reference has no "
                                  f"{extname} extension")
        return hdul[extname]

    def number(self, reftype: str, key: str, default=None, kind=int):
        """Header keyword ``key`` of the reference's primary header as ``kind`` (``default``
        when absent or blank), or a one-line error naming the file when it is not a number."""
        value = self.header(reftype).get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} keyword "
                                  f"{key}={value!r} is not a number") from None

    def _cut(self, reftype: str, plane: tuple[int, int]) -> tuple[slice, slice] | None:
        """Rows and columns of a reference plane of shape ``plane`` that cover the
        exposure, or None when it does not cover it."""
        m = self.meta
        if tuple(plane) == (m.ny, m.nx):
            return slice(None), slice(None)
        x0 = m.substrt1 - self.number(reftype, "SUBSTRT1", 1)
        y0 = m.substrt2 - self.number(reftype, "SUBSTRT2", 1)
        if x0 < 0 or y0 < 0 or y0 + m.ny > plane[0] or x0 + m.nx > plane[1]:
            return None
        return slice(y0, y0 + m.ny), slice(x0, x0 + m.nx)

    def window(self, reftype: str, shape: tuple[int, int]) -> tuple[slice, slice]:
        """Rows and columns of a reference plane of ``shape`` that cover the exposure.

        A reference of the exposure's shape is used as it is; a larger one (full frame,
        or a subarray containing ours) is cut using both files' SUBSTRT keywords."""
        cut = self._cut(reftype, tuple(shape))
        if cut is None:
            raise self.shape_error(reftype, "plane", tuple(shape), IMAGE)
        return cut

    def shape(self, reftype: str, extname: str, layout: tuple[str, ...] | None = None, *,
              why: str | None = None) -> tuple[int, ...]:
        """The shape of a reference image extension, checked against the exposure.

        ``layout`` names the axes the caller expects, last two ``ny, nx`` (see
        :data:`IMAGE`): a name ending in ``?`` is a leading axis that may be absent, one
        ending in ``>=N`` needs at least N entries (``why`` then says why, in the error);
        without ``layout`` any leading axes are accepted. Always checked: the extension
        exists and is an image, no axis is empty, and the last two axes cover the
        exposure's subarray. Anything else is a one-line :class:`ReferenceError_` naming
        the file, the reference type and extension, the shape found and the one expected."""
        hdu = self._hdu(reftype, extname)
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU)):
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} {extname} is a "
                                  f"{type(hdu).__name__}, not an image")
        shape = tuple(hdu.shape)
        layout = tuple(layout) if layout is not None else ANY_IMAGE
        key = (reftype, extname, layout)
        if key not in self._checked:
            if not _fits_layout(shape, layout):
                raise self.shape_error(reftype, extname, shape, layout, why)
            if self._cut(reftype, shape[-2:]) is None:
                raise self.shape_error(reftype, extname, shape, layout, self._placed(reftype))
            self._checked.add(key)
        return shape

    def shape_error(self, reftype: str, extname: str, shape: tuple[int, ...],
                    layout: tuple[str, ...], why: str | None = None) -> ReferenceError_:
        """The one-line error for a reference array of the wrong shape (``why``, if
        given, ends it)."""
        m = self.meta
        text = (f"{self.path(reftype)}: {reftype.upper()} {extname} has shape {shape}, expected "
                f"[{', '.join(layout)}] covering the exposure's {m.ny}x{m.nx} {m.subarray} "
                f"subarray at (row {m.substrt2}, column {m.substrt1})")
        if any(n == 0 for n in shape):
            why = why or "an axis is empty"
        return ReferenceError_(f"{text}; {why}" if why else text)

    def _placed(self, reftype: str) -> str | None:
        """Where a reference's SUBSTRT keywords put it, when they say it is a subarray."""
        hdr = self.header(reftype)
        if "SUBSTRT1" not in hdr and "SUBSTRT2" not in hdr:
            return None
        x0, y0 = self.number(reftype, "SUBSTRT1", 1), self.number(reftype, "SUBSTRT2", 1)
        if (x0, y0) in ((1, 1), (self.meta.substrt1, self.meta.substrt2)):
            return None
        return f"its SUBSTRT1/SUBSTRT2 place it at (row {y0}, column {x0})"

    def array(self, reftype: str, extname: str, dtype=np.float32, index: tuple = (), *,
              layout: tuple[str, ...] | None = None) -> np.ndarray:
        """A reference array cut to the exposure (the last two axes are cut); ``index``
        selects along the leading axes first, so that only those planes are read.
        ``layout``: the axes expected (see :meth:`shape`)."""
        shape = self.shape(reftype, extname, layout)
        hdu = self.hdul(reftype)[extname]
        if len(index) > len(shape) - 2:
            raise self.shape_error(reftype, extname, shape,
                                   ("n",) * len(index) + ANY_IMAGE)
        rows, cols = self.window(reftype, shape[-2:])
        index = tuple(index) + (slice(None),) * (len(shape) - 2 - len(index))
        bzero = float(hdu.header.get("BZERO", 0.0))
        bscale = float(hdu.header.get("BSCALE", 1.0))
        # positioned reads keep the file out of the process's resident memory
        stored = self._positioned(reftype, extname, index, slice(0, self.meta.ny))
        if stored is not None:
            if bzero == 0.0 and bscale == 1.0:
                return stored.astype(dtype, copy=False)
            return _scaled(stored, bscale, bzero, dtype)
        if bzero == 0.0 and bscale == 1.0:
            return np.array(hdu.data[(*index, rows, cols)], dtype=dtype)
        # scaled integers (uint32 DQ stored as int32 + BZERO) cannot be memory-mapped
        # scaled: map the stored integers and apply the scaling to the part read
        stored = self._unscaled(reftype)[extname].data[(*index, rows, cols)]
        return _scaled(stored, bscale, bzero, dtype)

    def shared(self, reftype: str, extname: str, *,
               layout: tuple[str, ...] | None = None) -> np.ndarray:
        """:meth:`array` (float32) read once and shared by every step that asks: a
        read-only array (gain and read noise serve both jump and ramp_fit)."""
        self.shape(reftype, extname, layout)
        key = ("shared", reftype, extname)
        with self._lock:
            hit = self._cache.get(key)
        if hit is None:
            hit = self.array(reftype, extname)
            hit.setflags(write=False)
            with self._lock:
                hit = self._cache.setdefault(key, hit)
        return hit

    def block(self, reftype: str, extname: str, index: tuple = (), rows: slice = slice(None), *,
              nan_to_zero: bool = False, cache: bool = False, transient: bool = False,
              columns: np.ndarray | None = None) -> np.ndarray:
        """Like :meth:`array` (float32, cut to the exposure, ``index`` selecting along the
        leading axes) restricted to the exposure's rows ``rows``, read with positioned
        reads rather than through a memory map, so that reading a large reference (a 4-D
        dark) a band at a time neither copies whole planes nor adds the file to the
        process's resident memory. ``nan_to_zero`` replaces NaN by 0 (for a reference
        that is subtracted with NaN meaning "no correction": ``x - 0`` is ``x`` exactly).
        ``cache`` keeps the result for the next identical call while the cache has room
        (for blocks used again and again, such as the last dark integration that every
        later science integration uses); the returned array must then not be modified.
        ``transient`` (without ``cache``) returns this thread's reusable block buffer,
        valid until the thread's next transient block: for a block used at once and
        dropped, which then costs no fresh memory (and its page faults) per call.
        ``columns``: those exposure columns only (a chunk's ``columns``), read a plane at
        a time so that the rows' other columns take no memory. Thread-safe."""
        rows = slice(*rows.indices(self.meta.ny))
        key = (reftype, extname, tuple(_index_key(i) for i in index), rows.start, rows.stop,
               nan_to_zero, None if columns is None else tuple(columns.tolist()))
        if cache:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
        hdu = self._hdu(reftype, extname)
        scaled = (float(hdu.header.get("BZERO", 0.0)) != 0.0
                  or float(hdu.header.get("BSCALE", 1.0)) != 1.0)
        out = None if scaled else self._positioned(reftype, extname, tuple(index), rows,
                                                   nan_to_zero=nan_to_zero,
                                                   transient=transient and not cache,
                                                   columns=columns)
        if out is None:
            out = self.array(reftype, extname, index=tuple(index))[..., rows, :]
            if columns is not None:
                out = out[..., columns]
            if nan_to_zero:
                out = np.where(np.isnan(out), 0, out)
        out = out.astype(np.float32, copy=False)
        if cache:
            with self._lock:
                if out.nbytes <= self._cache_left and key not in self._cache:
                    out.setflags(write=False)
                    self._cache[key] = out
                    self._cache_left -= out.nbytes
        return out

    def _positioned(self, reftype: str, extname: str, index: tuple, rows: slice, *,
                    nan_to_zero: bool = False, transient: bool = False,
                    columns: np.ndarray | None = None) -> np.ndarray | None:
        """The stored values (native byte order, not scaled) of an uncompressed image
        extension, cut to the exposure's rows ``rows`` and columns (``columns`` of them,
        if given), ``index`` selecting along the leading axes (ints drop an axis, slices
        keep it); read with positioned reads. None when the extension is not a plain
        image or ``index`` holds other selections. ``nan_to_zero`` replaces NaN by 0 on
        the way."""
        shape = self.shape(reftype, extname)
        hdu = self.hdul(reftype)[extname]
        nlead = len(shape) - 2
        native = _FLOAT_BITPIX.get(hdu.header.get("BITPIX"))
        if (native is None or len(shape) < 2 or len(index) > nlead
                or not isinstance(hdu, (fits.ImageHDU, fits.PrimaryHDU))
                or isinstance(hdu, fits.CompImageHDU)
                or not all(isinstance(i, (slice, int, np.integer)) for i in index)
                or any(isinstance(i, slice) and i.step not in (None, 1) for i in index)):
            return None
        ref_rows, ref_cols = self.window(reftype, shape[-2:])
        ny_ref, nx_ref = shape[-2:]
        y0 = (ref_rows.start or 0) + rows.start
        nrows = rows.stop - rows.start
        axes = []
        out_lead = []
        for axis, size in enumerate(shape[:nlead]):
            pick = index[axis] if axis < len(index) else slice(None)
            if isinstance(pick, slice):
                picked = range(*pick.indices(size))
                out_lead.append(len(picked))
            else:
                k = int(pick)
                if not -size <= k < size:
                    raise ReferenceError_(f"{self.path(reftype)}: {reftype} {extname} has no "
                                          f"plane {k} along axis {axis}")
                picked = range(k % size, k % size + 1)
            axes.append(picked)
        planes = [0]
        for axis, picked in enumerate(axes):
            planes = [p * shape[axis] + k for p in planes for k in picked]
        itemsize = np.dtype(native).itemsize
        fd = self._fd(reftype)
        start = hdu.fileinfo()["datLoc"]
        if columns is not None:
            # a plane's rows at a time into the read buffer, those columns kept
            picked = np.arange(nx_ref)[ref_cols][columns]
            out = np.empty((len(planes), nrows, picked.size), native)
            raw = self._buffers.get("read", (nrows, nx_ref), np.dtype(native).newbyteorder(">"))
            for j, plane in enumerate(planes):
                if not read_at(fd, raw, start + ((plane * ny_ref + y0) * nx_ref) * itemsize):
                    raise ReferenceError_(f"{self.path(reftype)}: {reftype} {extname} is "
                                          "truncated")
                out[j] = raw[:, picked]
            if nan_to_zero and out.dtype.kind == "f":
                np.copyto(out, 0, where=np.isnan(out))
            return out.reshape(*out_lead, nrows, picked.size)
        whole_rows = ref_cols == slice(None) or (ref_cols.start, ref_cols.stop) == (0, nx_ref)
        block = (len(planes), nrows, nx_ref)
        # float32 over whole rows, the common case, is read straight into the array it
        # is returned in and swapped to native order there (NaN replaced) in one C pass
        # outside the GIL: no second copy of a reference held while it is converted
        in_place = native is np.float32 and whole_rows
        if in_place:
            out = (self._buffers.get("transient", block, np.float32) if transient
                   else np.empty(block, np.float32))
            raw = out.view(">f4")
        else:
            raw = self._buffers.get("read", block, np.dtype(native).newbyteorder(">"))
        for j, plane in enumerate(planes):
            if not read_at(fd, raw[j], start + ((plane * ny_ref + y0) * nx_ref) * itemsize):
                raise ReferenceError_(f"{self.path(reftype)}: {reftype} {extname} is truncated")
        if in_place:
            _convert.streamdet_float32_from_big_endian(
                pointer(_convert_ffi, raw.view(np.uint32)), pointer(_convert_ffi, out), out.size,
                nan_to_zero)
        else:
            if not whole_rows:
                raw = raw[:, :, ref_cols]
            out = raw.astype(native)  # (a copy of the reused read buffer; numpy releases the GIL)
            if nan_to_zero and out.dtype.kind == "f":
                np.copyto(out, 0, where=np.isnan(out))
        return out.reshape(*out_lead, nrows, out.shape[-1])

    def drop_buffers(self) -> None:
        """Free the threads' read and transient-block buffers (the integration pass is
        over: the band pass reads no blocks, and its memory should not carry them)."""
        self._buffers.drop()

    def _fd(self, reftype: str) -> int:
        with self._lock:
            fd = self._fds.get(reftype)
            if fd is None:
                fd = self._fds[reftype] = os.open(self.path(reftype), os.O_RDONLY)
            return fd

    def _unscaled(self, reftype: str) -> fits.HDUList:
        key = f"{reftype}:unscaled"
        if key not in self._open:
            self._open[key] = fits.open(self.path(reftype), memmap=True,
                                        do_not_scale_image_data=True)
        return self._open[key]

    def dq(self, reftype: str, extname: str = "DQ", index: tuple = (), *,
           layout: tuple[str, ...] | None = None) -> np.ndarray:
        """A reference DQ array decoded to JWST flag values and cut to the exposure."""
        raw = self.array(reftype, extname, dtype=np.uint32, index=index, layout=layout)
        dq_def = self.raw(reftype, "DQ_DEF") if self.has(reftype, "DQ_DEF") else None
        columns = {c.upper() for c in (getattr(getattr(dq_def, "dtype", None), "names", None)
                                       or ())}
        if dq_def is not None and not {"BIT", "NAME"} <= columns:
            raise ReferenceError_(f"{self.path(reftype)}: {reftype.upper()} DQ_DEF is not a "
                                  "table with BIT and NAME columns")
        return dqflags.decode_with_dq_def(raw, dq_def)

    def close(self) -> None:
        for hdul in self._open.values():
            hdul.close()
        self._open.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._cache.clear()


def _scaled(stored: np.ndarray, bscale: float, bzero: float, dtype) -> np.ndarray:
    """FITS scaling of stored values (``stored * BSCALE + BZERO``) as ``dtype``. Unsigned
    integers stored signed with the offset BZERO (every DQ array) only have their top
    bit flipped (:mod:`.fits_unsigned`): the same numbers as the float64 route, in one
    pass instead of four (0.02 s of a full frame's start)."""
    dtype = np.dtype(dtype)
    if (bscale == 1.0 and offset_signed(dtype) and stored.dtype.kind == "i"
            and stored.dtype.itemsize == dtype.itemsize and bzero == offset_of(dtype)):
        return from_stored(stored, dtype)
    return (stored.astype(np.float64) * bscale + bzero).astype(dtype)


#: the image axes every reference array ends with
IMAGE = ("ny", "nx")
#: any leading axes, then the image axes
ANY_IMAGE = ("...", *IMAGE)


def _fits_layout(shape: tuple[int, ...], layout: tuple[str, ...]) -> bool:
    """Whether ``shape`` has the axes ``layout`` names (see :meth:`References.shape`):
    ``name?`` is an optional leading axis, ``...`` any number of them, ``name>=N`` an
    axis of at least N entries; no axis may be empty."""
    if len(shape) < 2 or any(n <= 0 for n in shape):
        return False
    lead, names = shape[:-2], list(layout[:-2])
    if "..." in names:
        return len(lead) >= len([a for a in names if a not in ("...",) and not a.endswith("?")])
    # optional axes are dropped from the front, as many as the shape lacks
    drop = len(names) - len(lead)
    optional = [i for i, a in enumerate(names) if a.endswith("?")]
    if drop < 0 or drop > len(optional):
        return False
    kept = [a for i, a in enumerate(names) if i not in optional[:drop]]
    for size, name in zip(lead, kept):
        if ">=" in name and size < int(name.split(">=", 1)[1]):
            return False
    return True


def _index_key(pick):
    return (pick.start, pick.stop, pick.step) if isinstance(pick, slice) else int(pick)

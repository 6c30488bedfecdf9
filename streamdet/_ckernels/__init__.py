"""Compiled kernels: small C functions over numpy buffers.

Why C at all: the band threads share one interpreter, and numpy releases the GIL only
inside each operation. A step written as a few hundred numpy calls per band spends its
threads' time queueing for the GIL between them (measured: 1.26x on two cores for the
integration pass, where two separate processes reach 1.6-1.8x). A kernel call releases
the GIL for its whole duration, so a step whose per-pixel loop is one C call runs on
every core at once.

Each ``<name>.c`` here declares its functions once, in ``<name>.h``, which the C file
includes (the compiler checks the definitions against it) and from which ``setup.py``
builds, through cffi (``_build.py``), the module ``streamdet._ckernels._<name>``: its
``lib.<function>`` checks the number of arguments and the type of each, so a pointer of
the wrong element type (see :func:`pointer`) or a missing argument is a ``TypeError``,
not corrupted memory. Calls with many parameters pass them as one struct declared in the
header. Why cffi (API mode) rather than ctypes or Cython: the checks come from the C
declarations themselves, the C stays plain C, and a call costs what a ctypes call did
(measured: 1.51 vs 1.48 us for 7 arguments; 7.2 vs 9.2 us for saturation's 19 scalars
now one struct). There is one implementation per algorithm: the C function is the step's arithmetic, and
its Python wrapper prepares the buffers.

Conventions: arrays are passed as pointers to their first element (:func:`pointer`),
with element strides for any axis that may not be contiguous; sizes are ``int64_t``;
the C functions never allocate arrays that outlive the call and never call back into
Python. Supported platforms: Linux with GCC or clang (the kernels use GCC's
``target_clones`` and ``preadv``); that is what CI builds and tests.
"""

from __future__ import annotations

import ctypes
from contextlib import contextmanager

import numpy as np

#: C pointer types by numpy dtype (:func:`pointer`)
_POINTER_TYPES = {np.dtype(t): c for t, c in (
    (np.float32, "float *"), (np.float64, "double *"), (np.uint8, "uint8_t *"),
    (np.uint16, "uint16_t *"), (np.uint32, "uint32_t *"), (np.int16, "int16_t *"),
    (np.int32, "int32_t *"), (np.int64, "int64_t *"), (np.bool_, "uint8_t *"))}


def pointer(ffi, array: np.ndarray):
    """A pointer to ``array``'s first element typed by its dtype, for a cffi kernel: the
    call then refuses an array whose element type differs from the header's."""
    return ffi.cast(_POINTER_TYPES[array.dtype], ptr(array))


def ptr(array: np.ndarray) -> int:
    """Address of ``array``'s first element."""
    # Called tens of thousands of times per exposure on time series (several addresses
    # per integration and kernel call), always holding the GIL: the buffer protocol is
    # ~4x quicker than __array_interface__ for the usual writable contiguous array; the
    # others (strided views, read-only or empty arrays) refuse it and go the long way.
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    except (TypeError, ValueError, BufferError):
        return array.__array_interface__["data"][0]


def strides(array: np.ndarray) -> tuple[int, ...]:
    """``array``'s strides in elements."""
    return tuple(s // array.itemsize for s in array.strides)


@contextmanager
def group_planes(*arrays: np.ndarray, modified: tuple[int, ...] | None = None):
    """``[groups, rows, cols]`` arrays as the kernels take them: the arrays themselves when
    each group plane is contiguous and all share one group stride (in elements), as the
    engine's band views do; otherwise contiguous copies, of which those at positions
    ``modified`` (default: all) are written back when the block ends."""
    fine = (len({strides(a)[0] for a in arrays}) == 1
            and all(strides(a)[1:] == (a.shape[2], 1) for a in arrays))
    if fine:
        yield arrays
        return
    copies = tuple(np.ascontiguousarray(a) for a in arrays)
    yield copies
    for k in range(len(arrays)) if modified is None else modified:
        arrays[k][...] = copies[k]


def row_medians(values: np.ndarray) -> np.ndarray:
    """Median (float64) of the numbers of each row of ``values`` ``[rows, width]``
    (float32 or float64, NaN left out; NaN for a row with none): the mean, in float64,
    of the two middle values (one for an odd count) of the row as numpy's sort orders
    it, bit for bit, found by selection in C (``row_medians.c``); ``values`` is only
    read."""
    if values.ndim != 2:
        raise ValueError(f"row_medians takes a 2-D array, not {values.ndim}-D")
    if values.dtype not in (np.float32, np.float64):
        raise TypeError(f"row_medians takes float32 or float64 values, not {values.dtype}")
    if values.shape[1] > 1 and values.strides[1] != values.itemsize:
        values = np.ascontiguousarray(values)
    out = np.empty(values.shape[0])
    from ._row_medians import ffi, lib
    medians = (lib.streamdet_row_medians_f32 if values.dtype == np.float32
               else lib.streamdet_row_medians_f64)
    if medians(pointer(ffi, values), strides(values)[0], values.shape[1], values.shape[0],
               pointer(ffi, out)):
        raise MemoryError("no scratch memory for the row medians")
    return out

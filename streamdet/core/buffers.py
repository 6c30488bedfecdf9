"""Buffers: memory that each thread reuses from piece to piece, and filling or emptying
it at a file offset.

The engine, the exposure reader and the reference reader all work a piece at a time on
several threads. Fresh arrays for every piece would be paid for again and again in page
faults (the kernel zeroes every new page), so each thread keeps its buffers, by purpose,
until they are dropped. Positioned reads and writes (no shared file position) let the
threads use one descriptor at once.
"""

from __future__ import annotations

import os
import threading

import numpy as np


class ThreadBuffers:
    """Per-thread byte buffers by name, grown as needed, freed together by :meth:`drop`."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, str], np.ndarray] = {}  # (thread, name) -> bytes

    def get(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        """This thread's buffer ``name`` as a C-contiguous array of ``shape`` and
        ``dtype``; its contents are whatever the thread left there."""
        dtype = np.dtype(dtype)
        size = int(np.prod(shape)) * dtype.itemsize
        key = (threading.get_ident(), name)
        have = self._held.get(key)
        if have is None or have.size < size:
            have = self._held[key] = np.empty(size, np.uint8)
        return have[:size].view(dtype).reshape(shape)

    def drop(self) -> None:
        """Free every thread's buffers (arrays still in use stay valid)."""
        self._held.clear()


def fill_at(fd: int, array: np.ndarray, offset: int) -> int:
    """Fill the contiguous ``array`` from byte ``offset`` of ``fd``; returns the bytes
    read, fewer than ``array.nbytes`` if the file ends first. Every positioned read of
    streamdet's Python code goes through here (the C kernels do their own, see
    _ckernels/scratch.c)."""
    view = memoryview(array).cast("B")
    done = 0
    while done < view.nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def read_at(fd: int, array: np.ndarray, offset: int) -> bool:
    """Fill the contiguous ``array`` from byte ``offset`` of ``fd``; False if the file
    ends first."""
    return fill_at(fd, array, offset) == array.nbytes


def write_at(fd: int, array: np.ndarray, offset: int) -> None:
    """Write the contiguous ``array`` at byte ``offset`` of ``fd``."""
    view = memoryview(array).cast("B")
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

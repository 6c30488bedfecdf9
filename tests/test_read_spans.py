"""The input's band reads (``streamdet_read_spans``, _ckernels/scratch.c): the rows of a
band in each group plane, read without Python between the reads."""

from __future__ import annotations

import os

import numpy as np

from streamdet._ckernels import pointer
from streamdet._ckernels._scratch import ffi, lib


def test_spans_are_read_in_order_and_a_short_file_says_where_it_ended(tmp_path):
    planes = np.arange(5 * 6 * 4, dtype=np.uint16).reshape(5, 6, 4)  # groups, rows, cols
    path = tmp_path / "planes"
    path.write_bytes(b"HEAD" + planes.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.zeros((5, 2, 4), np.uint16)  # rows 3..4 of every plane
        plane_bytes = planes[0].nbytes
        done = lib.streamdet_read_spans(fd, ffi.cast("void *", pointer(ffi, out.view(np.uint8))),
                                        4 + 3 * 4 * 2, plane_bytes, 5, out[0].nbytes)
        assert done == 5
        assert np.array_equal(out, planes[:, 3:5])
        os.truncate(path, 4 + 2 * plane_bytes + 3 * 4 * 2 + 5)  # ends inside plane 2's span
        assert lib.streamdet_read_spans(fd, ffi.cast("void *", pointer(ffi, out.view(np.uint8))),
                                        4 + 3 * 4 * 2, plane_bytes, 5, out[0].nbytes) == 2
    finally:
        os.close(fd)
    assert lib.streamdet_read_spans(fd, ffi.cast("void *", pointer(ffi, out.view(np.uint8))),
                                    0, 1, 1, 1) < 0  # closed: -EBADF

"""The row-median kernel (streamdet/_ckernels/row_medians.c) against numpy's sort: the
median must be exactly the mean, in float64, of the two middle values of the row sorted
by numpy with its NaNs left out, whatever the row holds."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from streamdet._ckernels import row_medians


def sorted_median(values):
    """The definition: numpy's sort (NaN last), then the middle of the numbers."""
    ordered = np.sort(values, axis=1)
    n = np.count_nonzero(~np.isnan(values), axis=1)
    out = np.full(values.shape[0], np.nan)
    for p, count in enumerate(n):
        if count:
            out[p] = (float(ordered[p, (count - 1) // 2]) + float(ordered[p, count // 2])) * 0.5
    return out


def assert_same(got, want):
    assert got.dtype == np.float64
    # bit for bit; a zero median may carry either sign (-0.0 == 0.0 in both orders)
    np.testing.assert_array_equal(got + 0.0, want + 0.0)


def random_rows(rng, dtype, kind, rows, width, nan_fraction):
    if kind == "normal":
        values = rng.normal(300.0, 25.0, (rows, width))
    elif kind == "ties":                 # few distinct values: long runs of equal ones
        values = rng.integers(-3, 4, (rows, width)).astype(np.float64)
    elif kind == "ordered":              # sorted and reverse-sorted rows
        values = np.sort(rng.normal(0.0, 1.0, (rows, width)), axis=1)
        values[1::2] = values[1::2, ::-1]
    else:                                # infinities and signed zeros
        values = rng.choice([-np.inf, np.inf, 0.0, -0.0, 1.0, -2.5], (rows, width))
    values = values.astype(dtype)
    values[rng.random(values.shape) < nan_fraction] = np.nan
    return values


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "ordered", "special"])
# widths below, around and far above the kernel's small-range and sampling thresholds
@pytest.mark.parametrize("width", [1, 2, 3, 15, 16, 17, 33, 200, 1023, 1024, 1500, 2900])
def test_equals_the_sorted_median(dtype, kind, width):
    rng = np.random.default_rng([width, len(kind), np.dtype(dtype).itemsize])
    for nan_fraction in (0.0, 0.02, 0.5, 0.97):
        values = random_rows(rng, dtype, kind, 9, width, nan_fraction)
        original = values.copy()
        assert_same(row_medians(values), sorted_median(values))
        np.testing.assert_array_equal(values, original)   # only read


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_odd_even_one_and_no_numbers(dtype):
    nan = np.nan
    values = np.array([[1, 2, 3, 4, nan], [nan, 3, 1, nan, 2], [nan, nan, 5, nan, nan],
                       [nan] * 5, [9, -3, 8, 0.1, 7], [4, 4, 4, 4, 4]], dtype)
    np.testing.assert_array_equal(row_medians(values),
                                  [2.5, 2.0, 5.0, nan, float(dtype(7)), 4.0])


def test_the_middle_values_are_averaged_in_float64():
    # 16777216 and 16777218 average to 16777217, which float32 cannot hold
    values = np.array([[16777218.0, 16777216.0]], np.float32)
    assert row_medians(values)[0] == 16777217.0


def test_rows_from_a_strided_view_and_the_sampled_path_near_the_middle():
    rng = np.random.default_rng(7)
    big = rng.normal(0.0, 1.0, (40, 6000)).astype(np.float32)
    view = big[::3, 1000:4000]        # row stride 3 * 6000, 3000 wide: sampled first pass
    assert_same(row_medians(view), sorted_median(view))
    # many values equal to the median: the middle pass keeps them all
    tied = np.where(rng.random((5, 3000)) < 0.6, np.float32(1.0),
                    rng.normal(0.0, 3.0, (5, 3000)).astype(np.float32))
    assert_same(row_medians(tied), sorted_median(tied))


@pytest.mark.parametrize("width", [66, 100, 256, 301, 1100])
def test_many_rows_each_way_the_middle_can_fall(width):
    """Enough rows that every case of the sampled first pass occurs: the middle value
    below, among or above the kept ones, and the second middle value kept or not."""
    rng = np.random.default_rng(width)
    values = rng.normal(0.0, 1.0, (3000, width)).astype(np.float32)
    values[:1000] = np.round(values[:1000] * 4)          # ties around the middle
    values[2000:][rng.random((1000, width)) < 0.1] = np.nan
    assert_same(row_medians(values), sorted_median(values))


def test_the_plain_c_path_gives_the_same_medians(tmp_path):
    """Without AVX-512 (forced here) the rows take the plain C quickselect."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import numpy as np\n"
        "from streamdet._ckernels import row_medians\n"
        "rng = np.random.default_rng(3)\n"
        "for width in (1, 2, 9, 16, 17, 64, 100, 2900):\n"
        "    for dtype in (np.float32, np.float64):\n"
        "        v = rng.normal(0, 1, (200, width)).astype(dtype)\n"
        "        v[:70] = np.round(v[:70] * 3)\n"
        "        v[rng.random(v.shape) < 0.2] = np.nan\n"
        "        np.save(f'{width}_{v.itemsize}_in.npy', v)\n"
        "        np.save(f'{width}_{v.itemsize}_out.npy', row_medians(v))\n")
    env = dict(os.environ, STREAMDET_KERNELS_NO_AVX512="1")
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, check=True)
    for width in (1, 2, 9, 16, 17, 64, 100, 2900):
        for size in (4, 8):
            values = np.load(tmp_path / f"{width}_{size}_in.npy")
            assert_same(np.load(tmp_path / f"{width}_{size}_out.npy"), sorted_median(values))


def test_empty_inputs():
    assert row_medians(np.empty((0, 5), np.float32)).shape == (0,)
    assert np.isnan(row_medians(np.empty((3, 0), np.float32))).all()


@pytest.mark.parametrize("dtype", [np.int64, np.float16, np.uint8])
def test_a_wrong_dtype_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        row_medians(np.zeros((2, 3), dtype))


def test_the_kernel_refuses_a_pointer_of_the_wrong_type():
    from streamdet._ckernels import pointer
    from streamdet._ckernels._row_medians import ffi, lib

    values = np.ones((2, 3), np.float64)
    out = np.zeros(2)
    with pytest.raises(TypeError):
        lib.streamdet_row_medians_f32(pointer(ffi, values), 3, 3, 2, pointer(ffi, out))
    assert lib.streamdet_row_medians_f64(pointer(ffi, values), 3, 3, 2, pointer(ffi, out)) == 0
    assert out.tolist() == [1.0, 1.0]

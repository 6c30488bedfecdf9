"""Every compiled kernel is declared once, in a C header, and reached through cffi: the C
file includes its header (the compiler checks each definition against it), the built
module ``streamdet._ckernels._<name>`` exposes exactly what the header declares, and a
call with a pointer of the wrong element type, or a missing argument, is a TypeError
raised before any C runs (not corrupted memory)."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import streamdet._ckernels as kernels
from streamdet._ckernels._build import CALLS, declarations

HERE = Path(kernels.__file__).parent
SOURCES = sorted(p.stem for p in HERE.glob("*.c"))


def declared_functions(name: str) -> list[str]:
    """The functions ``<name>.h`` declares (its prototypes, outside struct typedefs)."""
    if not (HERE / f"{name}.h").exists():
        pytest.fail(f"streamdet/_ckernels/{name}.c has no header {name}.h")
    text = re.sub(r"/\*.*?\*/", "", declarations(HERE / f"{name}.h"), flags=re.S)
    text = re.sub(r"typedef\s+struct\s*\{.*?\}\s*\w+\s*;", "", text, flags=re.S)
    return re.findall(r"(\w+)\s*\([^;{]*\)\s*;", text)


def module(name: str):
    return importlib.import_module(f"streamdet._ckernels._{name}")


def _functions():
    for name in SOURCES:
        if (HERE / f"{name}.h").exists():
            for function in declared_functions(name):
                yield pytest.param(name, function, id=f"{name}.{function}")


def test_the_kernels_are_found():
    assert {"convert", "linearity", "refpix", "saturation", "scratch",
            "row_medians"} <= set(SOURCES)


@pytest.mark.parametrize("name", SOURCES)
def test_every_kernel_has_a_header_its_source_includes(name):
    assert declared_functions(name), f"{name}.h declares no function"
    assert f'#include "{name}.h"' in (HERE / f"{name}.c").read_text()


@pytest.mark.parametrize("name", SOURCES)
def test_the_built_module_exposes_every_declared_function(name):
    declared = declared_functions(name)
    missing = set(declared) - set(dir(module(name).lib))
    assert not missing, f"streamdet._ckernels._{name} lacks {sorted(missing)}"


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
@pytest.mark.parametrize("name", SOURCES)
def test_no_function_escapes_its_header(name):
    """The functions a C file exports are those of its header (and of the headers of the
    sources compiled in with it, _build.CALLS): helpers are static."""
    declared = [f for source in (name, *CALLS.get(name, ())) for f in declared_functions(source)]
    library = module(name).__file__
    listing = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True,
                             text=True, check=True).stdout
    exported = {fields[2] for fields in (line.split() for line in listing.splitlines())
                if len(fields) == 3 and fields[1] in "Ti" and not fields[2].startswith("PyInit_")}
    assert exported == set(declared)


def _arguments(ffi, function):
    """Harmless arguments of the right types for ``function``: NULL pointers, zeros."""
    out = []
    for ctype in ffi.typeof(function).args:
        out.append(ffi.NULL if ctype.kind == "pointer" else
                   0.0 if ctype.cname in ("float", "double") else 0)
    return out


@pytest.mark.parametrize("name,function", list(_functions()))
def test_a_missing_argument_is_a_type_error(name, function):
    kernel = module(name)
    fn = getattr(kernel.lib, function)
    args = _arguments(kernel.ffi, fn)
    with pytest.raises(TypeError, match="argument"):
        fn(*args[:-1])


def _typed_pointer_arguments(name, function):
    kernel = module(name)
    return [k for k, ctype in enumerate(kernel.ffi.typeof(getattr(kernel.lib, function)).args)
            if ctype.kind == "pointer" and ctype.item.cname != "void"]


# (the scratch functions take untyped byte buffers, void *: nothing to check there)
@pytest.mark.parametrize("name,function", [p for p in _functions()
                                           if _typed_pointer_arguments(*p.values)])
def test_a_pointer_of_the_wrong_type_is_a_type_error(name, function):
    kernel = module(name)
    ffi, fn = kernel.ffi, getattr(kernel.lib, function)
    args = _arguments(ffi, fn)
    typed = _typed_pointer_arguments(name, function)
    assert typed
    for k in typed:
        # a double array where the header says anything else; a float one for double
        wrong = "float[1]" if ffi.typeof(fn).args[k].item.cname == "double" else "double[1]"
        bad = list(args)
        bad[k] = ffi.new(wrong)
        with pytest.raises(TypeError):
            fn(*bad)


# -- the numpy wrappers: a wrong dtype stops at the call, the arrays untouched ------------

def test_linearity_refuses_float64_data():
    from streamdet.algorithms.linearity import apply_linearity_polynomial

    data = np.full((1, 3, 4, 5), 100.0)  # float64: the kernel takes float32
    coeffs = np.zeros((2, 4, 5), np.float32)
    coeffs[1] = 2.0
    with pytest.raises(TypeError, match="double"):
        apply_linearity_polynomial(data, np.zeros(data.shape, np.uint8), coeffs)
    assert (data == 100.0).all()
    # and the same call with float32 data does run the polynomial
    data32 = data.astype(np.float32)
    apply_linearity_polynomial(data32, np.zeros(data.shape, np.uint8), coeffs)
    assert (data32 == 200.0).all()


def test_saturation_refuses_an_int32_groupdq():
    from streamdet.algorithms.saturation import flag_saturation

    data = np.full((1, 4, 6, 7), 70000.0, np.float32)
    groupdq = np.zeros(data.shape, np.int32)  # the kernel takes uint8 flags
    pixeldq = np.zeros((6, 7), np.uint32)
    with pytest.raises(TypeError, match="int32_t"):
        flag_saturation(data, groupdq, pixeldq, np.full((6, 7), 60000.0, np.float32),
                        np.zeros((6, 7), np.uint32))
    assert not groupdq.any()


def test_refpix_refuses_float64_data():
    from streamdet.algorithms.refpix import apply_reference_drift

    data = np.ones((3, 4, 8))
    with pytest.raises(TypeError, match="double"):
        apply_reference_drift(data, None)
    assert (data == 1.0).all()


def test_convert_refuses_a_signed_source():
    from streamdet._ckernels import pointer
    from streamdet._ckernels._convert import ffi, lib

    raw = np.array([1, 2], ">i2")
    out = np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="int16_t"):
        lib.streamdet_float32_from_big_endian_int16(pointer(ffi, raw.astype(np.int16)),
                                                    pointer(ffi, out), 2, 1.0, 0.0, 0, 0)
    lib.streamdet_float32_from_big_endian_int16(pointer(ffi, raw.view(np.uint16)),
                                                pointer(ffi, out), 2, 1.0, 0.0, 0, 0)
    assert out.tolist() == [1.0, 2.0]


def test_scratch_refuses_a_missing_stride(tmp_path):
    from streamdet._ckernels import pointer
    from streamdet._ckernels._scratch import ffi, lib

    line = np.arange(4, dtype=np.float32)
    with open(tmp_path / "scratch", "w+b") as f:
        with pytest.raises(TypeError, match="argument"):
            lib.streamdet_scratch_write(f.fileno(), pointer(ffi, line), 0, 0, 1, 1, 1, 16, 16)
        assert f.read() == b""
        assert lib.streamdet_scratch_write(f.fileno(), pointer(ffi, line), 0, 0, 1, 1, 1, 16,
                                           16, 16) == 0
        assert np.frombuffer(f.read(), np.float32).tolist() == [0.0, 1.0, 2.0, 3.0]

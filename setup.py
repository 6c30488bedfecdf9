"""The compiled kernels (plain C over numpy buffers; see streamdet/_ckernels/__init__.py);
everything else is in pyproject.toml.

A kernel with a header (``<name>.h``) is built through cffi (streamdet/_ckernels/_build.py),
whose calls are checked against that header; the others are loaded with ctypes.
"""

from pathlib import Path

from setuptools import Extension, setup

KERNELS = Path("streamdet/_ckernels")
# (the same flags as _build.py's, which setup.py cannot import before cffi is set up)
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"]
with_header = {header.stem for header in KERNELS.glob("*.h")}

setup(
    ext_modules=[
        Extension(f"streamdet._ckernels.{source.stem}", [str(source)], extra_compile_args=FLAGS)
        for source in sorted(KERNELS.glob("*.c")) if source.stem not in with_header
    ],
    cffi_modules=[f"{KERNELS}/_build.py:{name}" for name in sorted(with_header)],
)

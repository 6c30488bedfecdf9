"""The compiled kernels (plain C over numpy buffers; see streamdet/_ckernels/__init__.py),
each declared in its header and built through cffi (streamdet/_ckernels/_build.py);
everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup

KERNELS = Path("streamdet/_ckernels")

setup(cffi_modules=[f"{KERNELS}/_build.py:{header.stem}"
                    for header in sorted(KERNELS.glob("*.h"))])

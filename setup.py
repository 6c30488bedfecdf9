"""The compiled kernels (plain C over numpy buffers, loaded with ctypes: see
streamdet/_ckernels/__init__.py); everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import Extension, setup

# -ffp-contract=off: a*b+c stays two roundings, as numpy computes it, so results are
# bit-identical to the numpy formulation the tests compare against
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"]

setup(ext_modules=[
    Extension(f"streamdet._ckernels.{source.stem}", [str(source)], extra_compile_args=FLAGS)
    for source in sorted(Path("streamdet/_ckernels").glob("*.c"))
])

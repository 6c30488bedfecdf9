"""The compiled per-ramp loops (plain C over numpy buffers, loaded with ctypes: see
streamdet_likely/kernel.py); everything else is in pyproject.toml."""

from setuptools import Extension, setup

# -ffp-contract=off: a*b+c stays two roundings, as in the formulas stcal evaluates
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"]

setup(ext_modules=[Extension("streamdet_likely._likely", ["streamdet_likely/_likely.c"],
                             extra_compile_args=FLAGS)])

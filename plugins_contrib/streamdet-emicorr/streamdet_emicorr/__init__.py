"""MIRI EMI correction for streamdet: jwst 3.0's ``emicorr`` step ("joint" algorithm) as an
inserted step plugin, placed right before ``saturation`` and skipped by default.

* :mod:`streamdet_emicorr.kernel` -- the readout clock / phase model, the joint fit of a
  phased waveform to straight ramps, and its subtraction (plain numpy functions);
* :mod:`streamdet_emicorr.table` -- the built-in MIRI frequency table and the reading and
  writing of EMICORR reference files in jwst's ASDF format;
* :mod:`streamdet_emicorr.step` -- the :class:`~streamdet.core.step.Step` and its hook.

Enable it with ``streamdet process FILE --set emicorr.skip=false``.
"""

from .kernel import Fitted, Readout, correct_exposure, fit_exposure  # noqa: F401
from .table import EmiTable, builtin_table, read_reference, write_reference  # noqa: F401

__version__ = "0.1.0"

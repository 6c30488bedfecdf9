"""streamdet-likely: the likelihood-based optimal ramp fit of Brandt (2024, PASP 136,
045004) as an alternative implementation of streamdet's ``ramp_fit`` step.

Select it with ``streamdet process FILE --use ramp_fit=likely``; the array kernel is
:func:`streamdet_likely.kernel.fit_likely`.
"""

from .kernel import fit_likely, solve_weights, used_differences

__version__ = "0.1.0"
__all__ = ["fit_likely", "solve_weights", "used_differences", "__version__"]

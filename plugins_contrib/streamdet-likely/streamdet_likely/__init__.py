"""streamdet-likely: jwst's LIKELY ramp fit (the likelihood fit of Brandt 2024, PASP 136,
045004/045005) as an implementation of streamdet's ``ramp_fit`` step.

Select it with ``streamdet process FILE --set ramp_fit.algorithm=LIKELY`` (jwst's
spelling) or ``--use ramp_fit=likely``; the array kernel is
:func:`streamdet_likely.kernel.fit_likely`.
"""

from .kernel import combine_integrations, find_jumps, fit_likely, gls_sums

__version__ = "0.2.0"
__all__ = ["combine_integrations", "find_jumps", "fit_likely", "gls_sums", "__version__"]

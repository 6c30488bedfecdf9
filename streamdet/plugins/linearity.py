"""The ``linearity`` step: the classical non-linearity correction on raw DN (jwst 3.0
``linearity``). The algorithm: :mod:`streamdet.algorithms.linearity`."""

from __future__ import annotations

import numpy as np

from streamdet.algorithms.linearity import apply_linearity_polynomial, prepare_linearity_reference
from streamdet.core.plugins import hookimpl
from streamdet.core.references import IMAGE
from streamdet.core.step import Step

from . import follows


class LinearityStep(Step):
    """Corrects the classical non-linearity on raw DN (jwst 3.0 ``linearity``).

    The reference is prepared once per exposure (its flags ORed into the pixel flags
    then); each band gets the polynomial of its rows."""

    name = "linearity"
    after = follows("linearity")
    reftypes = ("linearity",)
    status_keyword = "S_LINEAR"
    thread_safe = True
    recomputable = True
    data_only = True

    def prepare(self, meta, refs, pixeldq):
        if meta.nframes > 1:
            return "NFRAMES > 1 needs the read-level (INV_COEFFS) correction, not implemented"
        coeffs = refs.array("linearity", "COEFFS", layout=("ncoeffs>=2", "ny", "nx"))
        ref_dq = refs.dq("linearity", layout=IMAGE) if refs.has("linearity", "DQ") else None
        # (refs.array returns a new array each call: it is ours to repair in place)
        self.usable, contribution = prepare_linearity_reference(coeffs, ref_dq, copy=False)
        np.bitwise_or(pixeldq, contribution, out=pixeldq)
        return None

    def process(self, chunk):
        usable = self.usable[:, chunk.rows]
        if chunk.columns is not None:
            usable = usable[..., chunk.columns]
        apply_linearity_polynomial(chunk.data, chunk.groupdq, usable)


@hookimpl
def streamdet_steps():
    return [LinearityStep]

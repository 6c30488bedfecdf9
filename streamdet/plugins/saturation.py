"""The ``saturation`` step: flags saturated and A/D-floor groups from the SATURATION
reference (jwst 3.0 ``saturation``). The algorithm: :mod:`streamdet.algorithms.saturation`."""

from __future__ import annotations

from streamdet.algorithms.saturation import DEFAULTS, flag_saturation, saturation_reference_terms
from streamdet.core.plugins import hookimpl
from streamdet.core.references import IMAGE
from streamdet.core.step import Param, Step

from . import follows


class SaturationStep(Step):
    """Flags saturated and A/D-floor groups from the SATURATION reference (raw DN).

    The reference is turned into thresholds once per exposure; each band is flagged with
    the thresholds of its rows."""

    name = "saturation"
    after = follows("saturation")
    reftypes = ("saturation",)
    status_keyword = "S_SATURA"
    thread_safe = True
    recomputable = True
    column_local = True  # flags grow into neighbours within ``halo`` rows and columns
    params_spec = {
        "n_pix_grow_sat": Param(int, DEFAULTS.n_pix_grow_sat,
                                "grow saturation flags into this many neighbouring pixels",
                                min=0),
        "use_readpatt": Param(bool, DEFAULTS.use_readpatt,
                              "use the read pattern to flag groups that saturate within a group"),
    }

    def __init__(self, params=None):
        super().__init__(params)
        # flags grow this many pixels: a band of rows needs as many rows of context
        self.halo = int(self.params["n_pix_grow_sat"])

    def prepare(self, meta, refs, pixeldq):
        threshold = refs.array("saturation", "SCI", layout=IMAGE)
        threshold_dq = refs.dq("saturation", layout=IMAGE)
        self.terms = saturation_reference_terms(threshold, threshold_dq)
        self.nframes = meta.nframes
        return None

    def process(self, chunk):
        rows, columns = chunk.rows, chunk.columns
        terms = [term[rows] if columns is None else term[rows][:, columns]
                 for term in self.terms]
        flag_saturation(chunk.data, chunk.groupdq, chunk.pixeldq, None, None,
                        n_pix_grow_sat=self.params["n_pix_grow_sat"], nframes=self.nframes,
                        use_read_pattern=self.params["use_readpatt"],
                        reference_terms=tuple(terms))


@hookimpl
def streamdet_steps():
    return [SaturationStep]

"""The ``reset`` step: subtracts the MIRI RESET reference from the first groups (jwst 3.0
``reset``). The algorithm: :mod:`streamdet.algorithms.reset`."""

from __future__ import annotations

import numpy as np

from streamdet.algorithms.reset import reset_int_for, subtract_reset
from streamdet.core.plugins import hookimpl
from streamdet.core.references import IMAGE
from streamdet.core.step import Step

from . import follows


class ResetStep(Step):
    """Subtracts the MIRI RESET reference per integration and group (jwst 3.0 ``reset``).

    Runs when a RESET reference resolves; skipped when CRDS says N/A. The reference's
    DQ is ORed into the exposure's pixel flags once, in ``prepare``; each band then reads
    only the reference planes it needs, NaN already replaced by 0."""

    name = "reset"
    after = follows("reset")
    reftypes = ("reset",)
    status_keyword = "S_RESET"
    thread_safe = True
    recomputable = True
    data_only = True

    def prepare(self, meta, refs, pixeldq):
        shape = refs.shape("reset", "SCI", ("nints?", "ngroups", "ny", "nx"))
        self.ndim = len(shape)
        if self.ndim == 3:
            shape = (1, *shape)
        self.ref_nints = refs.number("reset", "NINTS", shape[0])
        self.ref_ngroups = refs.number("reset", "NGROUPS", shape[1])
        self.refs = refs
        self.n_corrected = min(meta.ngroups, self.ref_ngroups, shape[1])
        np.bitwise_or(pixeldq, refs.dq("reset", layout=IMAGE), out=pixeldq)
        # reference integrations that correct several science integrations stay converted
        chosen = [reset_int_for(int(i), self.ref_nints) for i in meta.int_index]
        self.reused = {k for k in chosen if chosen.count(k) > 1 or self.ndim == 3}
        return None

    def _planes(self, int_index: int, rows: slice, columns=None) -> np.ndarray:
        k = reset_int_for(int_index, self.ref_nints)
        index = (k, slice(0, self.n_corrected))
        return self.refs.block("reset", "SCI", index=index if self.ndim == 4 else index[1:],
                               rows=rows, nan_to_zero=True, cache=k in self.reused,
                               transient=True, columns=columns)

    def process(self, chunk):
        for k, i in enumerate(chunk.int_index):
            planes = self._planes(int(i), chunk.rows, chunk.columns)
            subtract_reset(chunk.data[k:k + 1], chunk.pixeldq, planes, None,
                           reset_ngroups=self.n_corrected, nan_zeroed=True)


@hookimpl
def streamdet_steps():
    return [ResetStep]

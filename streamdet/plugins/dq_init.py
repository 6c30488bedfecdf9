"""The ``dq_init`` step: seeds pixel and group flags from the MASK reference (jwst 3.0
``dq_init``). The algorithm: :mod:`streamdet.algorithms.dq_init`."""

from __future__ import annotations

from streamdet.algorithms.dq_init import apply_mask
from streamdet.core.plugins import hookimpl
from streamdet.core.references import IMAGE
from streamdet.core.step import Step

from . import follows


class DQInitStep(Step):
    """Seeds pixel and group flags from the MASK reference (jwst 3.0 ``dq_init``)."""

    name = "dq_init"
    after = follows("dq_init")
    reftypes = ("mask",)
    status_keyword = "S_DQINIT"
    thread_safe = True
    recomputable = True
    reads_data = False  # flags from flags and references
    column_local = True

    def prepare(self, meta, refs, pixeldq):
        self.mask_dq = refs.dq("mask", layout=IMAGE)
        return None

    def process(self, chunk):
        mask = self.mask_dq[chunk.rows]
        apply_mask(chunk.groupdq, chunk.pixeldq,
                   mask if chunk.columns is None else mask[:, chunk.columns])


@hookimpl
def streamdet_steps():
    return [DQInitStep]

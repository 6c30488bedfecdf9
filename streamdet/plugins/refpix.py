"""The ``refpix`` step: removes amplifier bias drift using the MIRI reference columns
(jwst 3.0 ``refpix``). The algorithm: :mod:`streamdet.algorithms.refpix`."""

from __future__ import annotations

import threading

import numpy as np

from streamdet.algorithms.refpix import (DEFAULTS, apply_reference_drift, applies_to,
                                         measure_reference_drift, reference_columns)
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Granularity, Param, Step

from . import follows


class RefpixStep(Step):
    """Removes amplifier bias drift using the MIRI reference columns (jwst 3.0 ``refpix``).

    The reference levels are statistics over every row of an integration, so the step
    works in two phases: while the engine's first pass streams each integration by, it
    collects the 8 reference columns (``survey``) and, once an integration is complete,
    measures its corrections; in the band pass it applies them to any rows
    (``process``). MIRI subarrays have too few reference columns and are skipped, as jwst
    does."""

    name = "refpix"
    after = follows("refpix")
    granularity = Granularity.EXPOSURE
    thread_safe = True
    status_keyword = "S_REFPIX"
    params_spec = {
        "odd_even_rows": Param(bool, DEFAULTS.odd_even_rows,
                               "separate reference levels for odd and even rows"),
    }

    def prepare(self, meta, refs, pixeldq):
        verdict = applies_to(meta.ny, meta.nx)
        if not verdict.applies:
            return verdict.message
        self.meta = meta
        self.pixeldq = pixeldq          # the exposure-wide flags, as they stand when measured
        self.columns = reference_columns(meta.nx)
        self.collected: dict[int, list] = {}   # integration -> [columns, rows seen]
        self.corrections: dict[int, np.ndarray | None] = {}
        self.warnings: tuple[str, ...] = ()
        self.lock = threading.Lock()
        return None

    def survey_columns(self, nx):
        return reference_columns(nx)

    def survey(self, chunk):
        rows = chunk.rows
        nrows = chunk.nrows
        # a pass for the surveys alone may hold a few columns only, these among them
        where = (self.columns if chunk.columns is None
                 else np.searchsorted(chunk.columns, self.columns))
        picked = chunk.data[:, :, :, where]
        for k, i in enumerate(chunk.int_index):
            i = int(i)
            with self.lock:
                entry = self.collected.get(i)
                if entry is None:
                    shape = (self.meta.ngroups, self.meta.ny, self.columns.size)
                    entry = self.collected[i] = [np.empty(shape, np.float32), 0]
            entry[0][:, rows] = picked[k]
            with self.lock:
                entry[1] += nrows
                complete = entry[1] >= self.meta.ny
                if complete:
                    del self.collected[i]
            if complete:
                corrections, warnings = measure_reference_drift(
                    entry[0], self.pixeldq[:, self.columns], self.meta.nx,
                    odd_even_rows=self.params["odd_even_rows"])
                with self.lock:
                    self.corrections[i] = corrections
                    self.warnings = warnings

    def process(self, chunk):
        first_row = chunk.rows.start
        for k, i in enumerate(chunk.int_index):
            apply_reference_drift(chunk.data[k], self.corrections[int(i)], first_row,
                                  odd_even_rows=self.params["odd_even_rows"])


@hookimpl
def streamdet_steps():
    return [RefpixStep]

"""The ``emicorr`` step: MIRI EMI correction inserted before ``saturation``, skipped by
default (as jwst 3.0's ``emicorr`` is). Enable it with ``--set emicorr.skip=false``.

Where the frequencies come from, first match wins:

1. ``--set emicorr.reference=FILE``: an EMICORR reference in jwst's ASDF format;
2. ``--override emicorr=FILE`` (the same, given like every other reference);
3. CRDS (``use_crds``, on by default), as jwst asks it: an EMICORR file if the context
   has one for the exposure;
4. the built-in table of :mod:`streamdet_emicorr.table` (CRDS says N/A, as in the
   caches ``streamdet simulate`` writes, or is not configured).

``--set emicorr.frequencies=Hz10,390.625`` replaces the table's frequency list for the
exposure (names of the table or values in Hz), keeping the table's clocks.

Streaming: jwst's default fit finds one amplitude and phase for all integrations, and the
pixels it trusts depend on a median over all of them, so the first integration cannot be
corrected before every integration has been seen. The step therefore declares the
engine's whole-exposure pre-pass (``Step.prepass``): before the first pass it reads the
input's integrations one at a time (two passes per frequency) and fits; then it corrects
each integration the engine hands it. The pre-pass sees the file's data, which is what
the step receives (only ``dq_init``, which changes no data, runs before it in the MIRI
chain). Memory: one integration plus one float32 map per integration.
"""

from __future__ import annotations

from streamdet.core.errors import BadInputError
from streamdet.core.plugins import hookimpl
from streamdet.core.step import Granularity, Param, Step

from .kernel import Readout, apply_fits, fit_exposure
from .table import EmiTable, builtin_table, read_reference

#: read patterns jwst's emicorr accepts
READ_PATTERNS = ("FAST", "FASTR1", "SLOW", "SLOWR1")
#: read patterns with a reset frame between integrations
RESET_FRAME_PATTERNS = ("FASTR1", "SLOWR1")
#: the least number of groups the joint fit works with (jwst skips below)
MIN_GROUPS = 3


class EmiCorrStep(Step):
    """Fits the MIRI EMI lines of the readout (a phased waveform per frequency, jointly
    with straight ramps) and subtracts them from the raw ramps (jwst 3.0 ``emicorr``,
    ``algorithm='joint'``)."""

    name = "emicorr"
    implementation = "joint"
    before = "saturation"
    granularity = Granularity.INTEGRATION
    prepass_exposure = True
    #: the MASK, to see the pixel DQ as jwst's emicorr does: the file's, plus dq_init's
    #: mask (the engine's exposure-wide pixeldq also carries flags that later steps take
    #: from their references up front, which jwst only adds after emicorr)
    reftypes = ("mask",)
    #: an EMICORR reference from ``--override emicorr=FILE`` or CRDS, else the built-in table
    optional_reftypes = ("emicorr",)
    default_skip = True
    status_keyword = "S_MIREMI"
    params_spec = {
        "algorithm": Param(str, "joint", "EMI fitting algorithm: jwst 3.0's default 'joint' "
                           "(its 'sequential' algorithm is not provided)", choices=("joint",)),
        "fit_ints_separately": Param(bool, False, "fit an amplitude and phase per integration "
                                     "instead of one for the whole exposure"),
        "frequencies": Param(str, "", "comma-separated frequencies to correct: table names "
                             "(Hz390, Hz10, ...) or Hz values; empty: the table's list for "
                             "the exposure's subarray"),
        "reference": Param(str, "", "EMICORR reference file (jwst's ASDF format) to use "
                           "instead of CRDS and the built-in table"),
        "use_crds": Param(bool, True, "ask CRDS for an EMICORR reference first (N/A or no "
                          "CRDS: the built-in table)"),
        "nphases_opt": Param(int, 500, "trial phase offsets of the chi-squared search", min=8),
    }

    def prepare(self, meta, refs, pixeldq):
        self.meta = meta
        self.fitted = None
        self.pixeldq = pixeldq | refs.dq("mask").astype(pixeldq.dtype)
        if meta.readpatt.upper() not in READ_PATTERNS:
            return f"EMI correction not implemented for read pattern {meta.readpatt}"
        if meta.ngroups < MIN_GROUPS:
            return f"EMI correction cannot be performed for ngroups={meta.ngroups}"
        if meta.nx % 4:
            return f"EMI correction needs whole groups of four columns ({meta.nx} columns)"
        self.table = self._table(refs)
        case = self.table.case(meta.subarray, meta.readpatt, meta.detector)
        if case is None and self.params["frequencies"]:
            # like jwst's on-the-fly frequencies: the clocks still come from the built-in table
            case = builtin_table().case(meta.subarray, meta.readpatt, meta.detector)
        if case is None:
            return (f"no EMI correction case for subarray {meta.subarray} read with "
                    f"{meta.readpatt} in {self.table.source}")
        try:
            if self.params["frequencies"]:
                self.components = self.table.parse(self.params["frequencies"])
            else:
                self.components = [self.table.component(n) for n in case.names]
        except KeyError as exc:
            raise BadInputError(f"emicorr: {exc.args[0]}") from None
        if not self.components:
            return f"no EMI frequency to correct for subarray {meta.subarray}"
        reset = case.frameclocks if meta.readpatt.upper() in RESET_FRAME_PATTERNS else 0
        nsamples = int(meta.header.get("NSAMPLES", 1) or 1)
        self.readout = Readout(case.rowclocks, reset, nsamples)
        self.case = case
        return None

    def _table(self, refs) -> EmiTable:
        given = self.params["reference"]
        if given:
            try:
                return read_reference(given)
            except (OSError, ValueError) as exc:
                raise BadInputError(f"emicorr.reference: {exc}") from None
        # the engine resolved the optional type: --override first, then CRDS
        found = refs.resolved.get("emicorr")
        if (found is not None and not found.not_applicable
                and (found.source == "override" or self.params["use_crds"])):
            try:
                table = read_reference(found.path)
            except (OSError, ValueError) as exc:
                raise BadInputError(f"emicorr: {found.header_value}: {exc}") from None
            table.source = found.header_value
            return table
        return builtin_table()

    def prepass(self, ramp):
        self.fitted = fit_exposure(lambda i: ramp.read(i)[0], ramp.nints, self.pixeldq,
                                   self.components, self.readout,
                                   nphases_opt=self.params["nphases_opt"],
                                   separate=self.params["fit_ints_separately"])

    def process(self, chunk):
        first = self.meta.intstart - 1
        for plane, absolute in enumerate(chunk.int_index):
            apply_fits(chunk.data[plane], int(absolute) - first, self.fitted)

    def finish(self):
        return {"R_EMICOR": self.table.source}


@hookimpl
def streamdet_steps():
    return [EmiCorrStep]

"""A step inserted after dark_current: removes each row's median from every group
(a toy destriper). Off by default; turn it on with --set row_median.skip=false."""

import numpy as np

from streamdet import hookimpl
from streamdet.core.step import Granularity, Param, Step


class RowMedian(Step):
    name = "row_median"                # a new name: the step is inserted ...
    implementation = "example"         # ... and this implementation serves it
    after = "dark_current"             # right after dark_current
    granularity = Granularity.GROUP    # pixel-local: any chunk of the ramp will do
    default_skip = True                # installing the plugin changes no product
    status_keyword = "S_ROWMED"        # COMPLETE or SKIPPED in the primary header
    params_spec = {"statistic": Param(str, "median", "what to remove from each row",
                                      choices=("median", "mean"))}

    def prepare(self, meta, refs, pixeldq):
        return "rows too short" if meta.nx < 16 else None  # a reason to skip, or None

    def process(self, chunk):          # chunk.data: float32 [nints, ngroups, nrows, nx]
        level = np.median if self.params["statistic"] == "median" else np.mean
        chunk.data -= level(chunk.data, axis=-1, keepdims=True).astype(np.float32)

    def finish(self):                  # extra primary-header keywords
        return {"ROWMEDST": self.params["statistic"]}


@hookimpl
def streamdet_steps():
    return [RowMedian]

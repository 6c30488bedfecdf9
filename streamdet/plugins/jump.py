"""The jump step: cosmic-ray detection on MIRI ramps (jwst 3.0's ``JumpStep``).

The algorithm, two-point differences as stcal 1.20 runs them, is
:mod:`streamdet.algorithms.jump`; the frame-wide shower and snowball searches stream
across the engine's passes (:mod:`streamdet.plugins.jump_showers`).  This wrapper reads
the gain and read noise, gathers the frame-wide facts the banded search needs (groups
DO_NOT_USE everywhere, the median gain, sigma-clip mode's group verdicts) and sums the
bands' counts into PRIMECRS/EXTNCRS.
"""

from __future__ import annotations

import os
import threading
from dataclasses import fields

import numpy as np

from streamdet.algorithms.jump import (JumpCounts, JumpParameters, cosmic_ray_keywords,
                                       detect_jumps, exposure_median_gain, search_mode,
                                       unusable_groups)
from streamdet.algorithms.showers import ShowerOptions, SnowballOptions
from streamdet.core.plugins import hookimpl
from streamdet.core.references import IMAGE
from streamdet.core.step import Granularity, Param, Step

from . import follows
from .jump_showers import ShowerSearch, SnowballSearch

#: the algorithms' defaults, which the step's parameters take (a dataclass's class
#: attribute is its field's default)
_JUMP, _SHOWERS, _SNOWBALLS = JumpParameters, ShowerOptions, SnowballOptions


def stcal_processes(maximum_cores: str, nrows: int) -> int:
    """How many processes jwst's jump would run for ``maximum_cores`` on this machine
    (stcal's compute_num_cores); streamdet itself always uses ``--threads``, but stcal
    honours ``minimum_groups`` only with more than one process."""
    value = str(maximum_cores)
    available = os.cpu_count() or 1
    if value.isnumeric():
        wanted = int(value)
    else:  # as stcal spells them: other values (e.g. 'none') mean one process
        wanted = {"quarter": available // 4 or 1, "half": available // 2 or 1,
                  "all": available}.get(value, 1)
    return max(1, min(nrows, wanted, available))


def _core_rows(chunk) -> tuple[int, int]:
    return chunk.rows.start + chunk.core.start, chunk.rows.start + chunk.core.stop


class JumpStep(Step):
    """Two-point-difference cosmic-ray detection (jwst 3.0 ``jump`` defaults).

    Needs every integration of a pixel at once (the median difference is taken over all
    of them) and one row of neighbours on each side (neighbour flagging)."""

    name = "jump"
    after = follows("jump")
    reftypes = ("gain", "readnoise")
    granularity = Granularity.EXPOSURE
    halo = 1
    thread_safe = True
    survey_with_bands = True
    status_keyword = "S_JUMP"
    params_spec = {
        "rejection_threshold": Param(float, _JUMP.rejection_threshold,
                                     "sigma threshold with 4+ usable differences", min=0),
        "three_group_rejection_threshold": Param(float, _JUMP.three_group_rejection_threshold,
                                                 "sigma threshold with 2 differences", min=0),
        "four_group_rejection_threshold": Param(float, _JUMP.four_group_rejection_threshold,
                                                "sigma threshold with 3 differences", min=0),
        "maximum_cores": Param(str, "1", "jwst's process count ('1', 'half', 'all', ...); streamdet "
                               "uses --threads, and like stcal honours minimum_groups only when "
                               "this means more than one process"),
        "flag_4_neighbors": Param(bool, _JUMP.flag_4_neighbors,
                                  "flag the 4 neighbours of mid-sized jumps"),
        "max_jump_to_flag_neighbors": Param(
            float, _JUMP.max_jump_to_flag_neighbors,
            "largest jump (sigma) whose neighbours are flagged", min=0),
        "min_jump_to_flag_neighbors": Param(
            float, _JUMP.min_jump_to_flag_neighbors,
            "smallest jump (sigma) whose neighbours are flagged", min=0),
        "after_jump_flag_dn1": Param(float, _JUMP.after_jump_flag_dn1,
                                     "jumps above this (DN) also flag the following groups", min=0),
        "after_jump_flag_time1": Param(float, _JUMP.after_jump_flag_time1,
                                       "... for this many seconds", min=0),
        "after_jump_flag_dn2": Param(float, _JUMP.after_jump_flag_dn2,
                                     "second after-jump threshold (DN)", min=0),
        "after_jump_flag_time2": Param(float, _JUMP.after_jump_flag_time2,
                                       "... and its time (s)", min=0),
        "expand_large_events": Param(bool, _JUMP.expand_large_events,
                                     "snowball flagging (near-IR detectors)"),
        "min_sat_area": Param(float, _SNOWBALLS.min_sat_area,
                              "snowballs: least area of the saturated core"),
        "min_jump_area": Param(float, _SNOWBALLS.min_jump_area,
                               "snowballs: least area of a jump patch"),
        "expand_factor": Param(float, _SNOWBALLS.expand_factor,
                               "snowballs: expansion of the enclosing ellipse"),
        "use_ellipses": Param(bool, False, "deprecated in jwst; no effect"),
        "sat_required_snowball": Param(bool, _SNOWBALLS.sat_required,
                                       "snowballs: require a saturated core"),
        "min_sat_radius_extend": Param(float, _SNOWBALLS.min_sat_radius_extend,
                                       "snowballs: least core radius to extend the core"),
        "sat_expand": Param(int, 2, "snowballs: pixels added to the core's radius"),
        "edge_size": Param(int, _SNOWBALLS.edge_size,
                           "snowballs: distance from the edge where no core is required"),
        "mask_snowball_core_next_int": Param(
            bool, _SNOWBALLS.persist_next_int,
            "snowballs: flag saturated cores in the next integration"),
        "snowball_time_masked_next_int": Param(
            int, 4000,
            "snowballs: seconds of the next integration flagged"),
        "find_showers": Param(bool, _JUMP.find_showers, "MIRI shower flagging"),
        "max_shower_amplitude": Param(float, 4.0,
                                      "showers: largest rate change (DN/s); jwst 3.0 ignores "
                                      "it and uses 6, so does streamdet"),
        "extend_snr_threshold": Param(float, _SHOWERS.snr_threshold,
                                      "showers: least ring-averaged significance"),
        "extend_min_area": Param(int, _SHOWERS.min_area,
                                 "showers: least area of the emission patch"),
        "extend_inner_radius": Param(float, _SHOWERS.inner_radius,
                                     "showers: inner radius of the ring kernel", min=0),
        "extend_outer_radius": Param(float, _SHOWERS.outer_radius,
                                     "showers: outer radius of the ring kernel", min=0),
        "extend_ellipse_expand_ratio": Param(float, _SHOWERS.expand_ratio,
                                             "showers: expansion of the fitted ellipse"),
        "time_masked_after_shower": Param(float, 15.0,
                                          "showers: seconds flagged after a shower", min=0),
        "min_diffs_single_pass": Param(
            int, _JUMP.min_diffs_single_pass,
            "below this many usable differences, search iteratively", min=1),
        "max_extended_radius": Param(int, 200,
                                     "largest radius of a flagged shower or snowball", min=0),
        "minimum_groups": Param(int, _JUMP.minimum_groups,
                                "fewest groups for jump detection", min=2),
        "minimum_sigclip_groups": Param(
            int, _JUMP.minimum_sigclip_groups,
            "integrations needed to sigma-clip across integrations", min=1),
        "only_use_ints": Param(bool, _JUMP.only_use_ints,
                               "sigma-clip each group across integrations only"),
    }

    #: parameters of the two-point search (detect_jumps; the frame-wide searches are the
    #: step's own business)
    _TWO_POINT = tuple(f.name for f in fields(JumpParameters)
                       if f.name not in ("expand_large_events", "find_showers"))

    def prepare(self, meta, refs, pixeldq):
        if meta.ngroups <= 2:
            return "needs at least 3 groups"
        self.meta = meta
        self.gain = refs.shared("gain", "SCI", layout=IMAGE)
        self.readnoise = refs.shared("readnoise", "SCI", layout=IMAGE)
        self.median_gain = exposure_median_gain(self.gain)
        two_point = {k: self.params[k] for k in self._TWO_POINT}
        if stcal_processes(self.params["maximum_cores"], meta.ny) == 1:
            # stcal's one-process path searches with 3 whatever minimum_groups says
            two_point["minimum_groups"] = 3
        self.two_point = JumpParameters(**two_point)
        # groups DO_NOT_USE in every pixel seen so far, ANDed over the surveyed pieces
        self.all_dnu = np.ones((meta.nints, meta.ngroups), dtype=bool)
        # the surveys bands were processed with (a fused pass surveys as the bands go)
        self.used_surveys: set[bytes] = set()
        self.counts: dict[tuple[int, int], JumpCounts] = {}
        self.global_flagged = None
        self.lock = threading.Lock()
        # the frame-wide searches after the two-point one, in stcal's order; each needs
        # an extra band pass (see the engine's frame_passes)
        self.snowballs = (SnowballSearch(self.params, meta)
                          if self.params["expand_large_events"] else None)
        self.showers = ShowerSearch(self.params, meta) if self.params["find_showers"] else None
        self.searches = [s for s in (self.snowballs, self.showers) if s is not None]
        return None

    def frame_passes(self):
        return len(self.searches)

    def gather_halo(self, stage):
        return self.searches[stage].gather_halo

    def gather(self, chunk, stage, context):
        # the searches skip the planes unusable everywhere: what they gathered stands
        # only if the survey they saw was the whole one
        all_dnu = self._surveyed(chunk, lambda dnu: dnu.tobytes())
        self.searches[stage].gather(chunk, self.dnu_after_searches(all_dnu),
                                    self.gain[chunk.rows], self.readnoise[chunk.rows], context)

    def between_passes(self, stage, context):
        self.searches[stage].search(self.dnu_after_searches(), context)
        # for the steps after jump (ramp_fit's MIRI discard of groups DO_NOT_USE
        # everywhere is jwst's decision on the flags jump leaves): snowball cores set to
        # exactly SATURATED take DO_NOT_USE away from later groups
        self.meta.state.jump_dnu_everywhere = self.dnu_after_searches()

    def dnu_after_searches(self, all_dnu=None):
        """Groups DO_NOT_USE everywhere (``all_dnu``: the survey's, by default) once the
        snowball search has run: its saturated cores are set to exactly SATURATED from
        their group on, which takes DO_NOT_USE away there (e.g. from the last group)."""
        all_dnu = self.all_dnu if all_dnu is None else all_dnu
        if self.snowballs is None or self.snowballs.result is None:
            return all_dnu
        out = all_dnu.copy()
        for kind, region in self.snowballs.result.operations:
            if kind == "saturate":
                out[region.integration, region.group:] = False
        return out

    def survey(self, chunk):
        local = chunk.int_index - self.meta.int_index[0]
        piece = unusable_groups(chunk.groupdq)
        with self.lock:
            self.all_dnu[local] &= piece

    def _surveyed(self, chunk, what_counts):
        """The survey as far as it has got, for ``chunk`` (a band of every integration).
        Noted for survey_complete: ``what_counts`` (what a band's results depend on) of
        the band's own survey. The survey the band uses lies between its own and the
        whole one, and what counts only grows with the groups unusable everywhere, so
        when the band's own agrees with the whole survey so does the one it used; noting
        its own rather than the one used makes the verdict the data's, not the threads'
        timing's."""
        own = unusable_groups(chunk.groupdq[:, :, chunk.core])
        depends_on = what_counts(own)
        with self.lock:
            self.used_surveys.add(depends_on)
            return self.all_dnu.copy()

    def _mode(self, all_dnu):
        return search_mode(all_dnu, self.two_point)

    def survey_complete(self):
        whole = {self._mode(self.all_dnu), self.all_dnu.tobytes()}
        stale = self.used_surveys - whole
        self.used_surveys.clear()
        return not stale

    def process(self, chunk):
        rows = chunk.rows
        self.counts[_core_rows(chunk)] = detect_jumps(
            chunk.data, chunk.groupdq, chunk.pixeldq,
            gain=self.gain[rows], readnoise=self.readnoise[rows],
            nframes=self.meta.nframes, group_time=self.meta.group_time,
            # the two-point search uses the survey only to choose its mode
            parameters=self.two_point, all_dnu_groups=self._surveyed(chunk, self._mode),
            median_gain=self.median_gain, all_flagged_groups=self.global_flagged,
            count_rows=chunk.core)
        for search in self.searches:
            if search.found is not None:  # known from an earlier pass
                search.apply(chunk, self.gain[rows])

    def rerun_rows(self):
        """Sigma-clip mode clears lone flags in integration-groups flagged in every pixel
        of the frame; a band that judged that on its own rows alone is redone."""
        verdicts = {key: c.all_flagged_groups for key, c in self.counts.items()
                    if c.all_flagged_groups is not None}
        if not verdicts or self.global_flagged is not None:
            # known from an earlier pass (the shower search's): every band since used it
            return []
        self.global_flagged = np.logical_and.reduce(list(verdicts.values()))
        return [slice(*key) for key, v in verdicts.items() if not np.array_equal(v, self.global_flagged)]

    def finish(self):
        total = sum(self.counts.values(), start=JumpCounts(0, 0, False, None)) \
            if self.counts else None
        if total is None:
            return {}
        for search in self.searches:  # the last one's count, as stcal reports it
            total.extended_events = search.found or 0
        primecrs, extncrs = cosmic_ray_keywords(total, self.dnu_after_searches(), self.meta.group_time,
                                                self.meta.ny, self.meta.nx)
        out = {}
        if primecrs is not None:
            out["PRIMECRS"] = primecrs
        if extncrs is not None:
            out["EXTNCRS"] = extncrs
        return out


@hookimpl
def streamdet_steps():
    return [JumpStep]

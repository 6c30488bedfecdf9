"""The jump step's frame-wide searches across the engine's passes: MIRI showers
(``find_showers``) and snowballs (``expand_large_events``).  Their algorithms are in
:mod:`streamdet.algorithms.showers`; here is how they stream: what each band gives the
extra pass, what is searched between the passes, and how the result reaches each band."""

from __future__ import annotations

import os
import tempfile
import threading

import numpy as np

from streamdet.algorithms import showers
from streamdet.core.buffers import read_at, write_at
from streamdet.core.dqflags import JUMP_DET, SATURATED


class ShowerSearch:
    """The jump step's MIRI shower search across the engine's passes (algorithm:
    :mod:`streamdet.algorithms.showers`).

    Extra band pass: each band (with ``kernel.halo`` + 1 rows of context, after the
    two-point search) yields the emission masks of its rows for every difference plane,
    kept bit-packed ([integration, difference, row, column/8], in memory or in a scratch
    file). Between the passes: one plane at a time, the patches become shower regions.
    Band pass proper: each band ORs the regions' flags into its rows and checks their
    amplitude before ramp_fit sees them."""

    #: bit-packed emission planes larger than this go to a scratch file
    IN_MEMORY_BYTES = 32 * 1024**2

    def __init__(self, params, meta):
        self.meta = meta
        self.kernel = showers.ring(params["extend_inner_radius"], params["extend_outer_radius"])
        self.threshold = params["extend_snr_threshold"]
        self.min_area = params["extend_min_area"]
        self.expand_ratio = params["extend_ellipse_expand_ratio"]
        # jwst's JumpStep passes twice the radius as stcal's largest full width
        self.max_width = 2 * params["max_extended_radius"]
        self.groups_masked = showers.groups_masked_after_shower(
            params["time_masked_after_shower"], meta.group_time)
        self.max_amplitude = showers.max_amplitude_electrons(meta.group_time)
        self.sigma_clip = meta.nints >= params["minimum_sigclip_groups"]
        self.dnu_or_refpix = np.ones((meta.nints, meta.ngroups), bool)
        self.pixels = np.zeros((meta.nints, meta.ngroups), np.int64)  # emission pixels per plane
        self.row_bytes = (meta.nx + 7) // 8
        self.store = None
        self.regions = None
        self.found = None  # showers, once searched
        self.lock = threading.Lock()

    @property
    def gather_halo(self):
        # the ring average of a core row reads kernel.halo rows around it, whose flags
        # need their own neighbours (the two-point search's halo)
        return self.kernel.halo

    # -- extra pass ----------------------------------------------------------------------
    def _open_store(self, context):
        shape = (self.meta.nints, self.meta.ngroups, self.meta.ny, self.row_bytes)
        with self.lock:
            if self.store is None:
                self.store = _PlaneStore(shape, context.scratch_dir, self.IN_MEMORY_BYTES)
        return self.store

    def gather(self, chunk, all_dnu, gain, readnoise, context):
        meta = self.meta
        core = chunk.core
        c0, c1, _ = core.indices(chunk.nrows)
        dnu_ref = showers.dnu_or_refpix_groups(chunk.groupdq[:, :, core], chunk.pixeldq[core])
        with self.lock:
            self.dnu_or_refpix &= dnu_ref
        if not showers.shower_search_possible(all_dnu):
            return
        store = self._open_store(context)
        gain = np.ascontiguousarray(gain, np.float32)
        if self.sigma_clip:
            stats = showers.sigma_clipped_median_std(chunk.data, chunk.groupdq, gain)
        else:
            stats = showers.median_and_sigma(chunk.data, chunk.groupdq, gain,
                                                  np.ascontiguousarray(readnoise, np.float32),
                                                  meta.nframes)
        frame_row = chunk.rows.start + c0
        counts = np.zeros((meta.nints, meta.ngroups), np.int64)
        buffer = np.empty((chunk.nrows, meta.nx), np.float32) if not self.sigma_clip else None
        for i in range(meta.nints):
            for g in range(1, meta.ngroups):
                if all_dnu[i, g]:  # masked everywhere: no emission
                    continue
                ratio = showers.ratio_plane(chunk.data, chunk.groupdq, chunk.pixeldq, gain,
                                                 i, g, stats, out=buffer)
                plane, n = showers.emission(ratio, self.kernel, self.threshold,
                                                 row0=chunk.rows.start, frame_ny=meta.ny, core=core)
                counts[i, g] = n
                # written even when empty: a band run again (rerun_rows) replaces its rows
                store.write(i, g, frame_row, np.packbits(plane, axis=1))
        with self.lock:
            self.pixels += counts

    # -- between the passes ----------------------------------------------------------------
    def search(self, all_dnu, context):
        meta = self.meta
        self.regions = []
        self.found = 0
        try:
            if not showers.shower_search_possible(all_dnu):
                return
            first = showers.first_searched_groups(self.dnu_or_refpix)
            planes = [(i, g) for i in range(meta.nints) for g in range(first[i], meta.ngroups)
                      if showers.could_hold_shower(int(self.pixels[i, g]), self.min_area)]

            def search_plane(plane):
                i, g = plane
                bits = np.unpackbits(self.store.read(i, g), axis=1, count=meta.nx)
                return i, g, showers.find_ellipses(bits, self.min_area)

            for i, g, ellipses in context.map(search_plane, planes):
                self.found += len(ellipses)
                for ellipse in ellipses:
                    region = showers.draw_region(ellipse, i, g, self.expand_ratio, self.max_width,
                                                      (meta.ny, meta.nx))
                    if region is not None:
                        self.regions.append(region)
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None

    # -- band pass proper --------------------------------------------------------------------
    def apply(self, chunk, gain):
        lo = chunk.rows.start + chunk.core.indices(chunk.nrows)[0]
        hi = chunk.rows.start + chunk.core.indices(chunk.nrows)[1]
        regions = [r for r in self.regions if r.rows.start < hi and r.rows.stop > lo]
        if not regions:
            return
        core = chunk.core
        after = chunk.groupdq[:, :, core]
        before = after.copy()
        showers.apply_regions(after, chunk.pixeldq[core], regions, self.groups_masked, row0=lo)
        showers.revert_large_changes(chunk.data[:, :, core], gain[core], before, after,
                                          self.max_amplitude)


class SnowballSearch:
    """The jump step's snowball search (``expand_large_events``) across the engine's
    passes (algorithm: :mod:`streamdet.algorithms.showers`): the extra band pass keeps
    each band's JUMP_DET and SATURATED bits bit-packed; between the passes each
    integration is searched group by group (whole planes); every later pass replays the
    operations found on its bands, halo rows included."""

    gather_halo = 0

    def __init__(self, params, meta):
        self.meta = meta
        self.options = showers.SnowballOptions(
            min_jump_area=params["min_jump_area"], min_sat_area=params["min_sat_area"],
            expand_factor=params["expand_factor"], sat_required=params["sat_required_snowball"],
            min_sat_radius_extend=params["min_sat_radius_extend"],
            sat_expand=params["sat_expand"] * 2,  # as jwst's JumpStep passes it
            edge_size=params["edge_size"], max_width=2 * params["max_extended_radius"],
            persist_next_int=params["mask_snowball_core_next_int"],
            persist_groups=int(params["snowball_time_masked_next_int"] // meta.group_time))
        self.stores = None
        self.result = None
        self.found = None
        self.lock = threading.Lock()

    def gather(self, chunk, all_dnu, gain, readnoise, context):
        meta = self.meta
        with self.lock:
            if self.stores is None:
                shape = (meta.nints, meta.ngroups, meta.ny, (meta.nx + 7) // 8)
                self.stores = {bit: _PlaneStore(shape, context.scratch_dir, ShowerSearch.IN_MEMORY_BYTES)
                               for bit in (JUMP_DET, SATURATED)}
        core = chunk.groupdq[:, :, chunk.core]
        row = chunk.rows.start + chunk.core.indices(chunk.nrows)[0]
        for bit, store in self.stores.items():
            for i in range(meta.nints):
                for g in range(meta.ngroups):
                    store.write(i, g, row, np.packbits((core[i, g] & np.uint8(bit)) != 0, axis=1))

    def search(self, all_dnu, context):
        meta = self.meta
        try:
            def one(i):
                def plane(bit, g):
                    return np.unpackbits(self.stores[bit].read(i, g), axis=1, count=meta.nx).astype(bool)
                return showers.search_integration_snowballs(
                    i, lambda g: plane(JUMP_DET, g), lambda g: plane(SATURATED, g), meta.ngroups,
                    (meta.ny, meta.nx), self.options)

            operations, persist, count = [], [], 0
            for ops, pers, n in context.map(one, range(meta.nints)):
                operations += ops
                persist += pers
                count += n
            opts = self.options
            keep = opts.persist_next_int and opts.persist_groups >= 1
            self.result = showers.Snowballs(operations, persist if keep else [],
                                                 slice(1, min(opts.persist_groups, meta.ngroups)), count)
            self.found = count
        finally:
            if self.stores is not None:
                for store in self.stores.values():
                    store.close()
                self.stores = None

    def apply(self, chunk, gain):
        showers.apply_snowballs(chunk.groupdq, self.result, row0=chunk.rows.start)


class _PlaneStore:
    """Bit-packed emission planes [nints, ngroups, ny, row_bytes]: a numpy array when
    small, else a nameless scratch file (like the engine's: nothing is left behind however
    the process ends) moved with positioned reads and writes."""

    def __init__(self, shape, directory, in_memory_bytes):
        self.shape = shape
        self.plane_bytes = shape[2] * shape[3]
        self.file = None
        if int(np.prod(shape)) <= in_memory_bytes:
            self.array = np.zeros(shape, np.uint8)
            return
        self.file = tempfile.TemporaryFile(prefix="streamdet-showers-", dir=directory)
        os.ftruncate(self.file.fileno(), int(np.prod(shape)))

    def _offset(self, i, g, row):
        return ((i * self.shape[1] + g) * self.shape[2] + row) * self.shape[3]

    def write(self, i, g, row, packed):
        if self.file is None:
            self.array[i, g, row:row + packed.shape[0]] = packed
            return
        write_at(self.file.fileno(), np.ascontiguousarray(packed), self._offset(i, g, row))

    def read(self, i, g):
        if self.file is None:
            return self.array[i, g]
        plane = np.empty((self.shape[2], self.shape[3]), np.uint8)
        if not read_at(self.file.fileno(), plane, self._offset(i, g, 0)):
            raise OSError(f"short read from the shower scratch file {self.file.name}")
        return plane

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        self.array = None

"""The quick-look observer.

When an exposure's products are written, draws one PNG beside them,
``<base>_quicklook.png``:

* top: the last group of integration 1 as read from the Level 1B file (DN) and the
  exposure's rate image (DN/s), each log-stretched between its 1st and 99.5th
  percentiles - the before/after pair of the jwst Detector1 notebooks;
* bottom left: the DQ summary of the rate product, pixels per flag name
  (:data:`streamdet.core.dqflags.PIXEL`);
* bottom right: the seconds spent in each step (the engine's ``timings``);
* title: the exposure, and the steps served by a plugin rather than the built-in
  implementation (noted from the chain announced in ``streamdet_exposure_started``).

Contract with the engine, since an installed plugin takes part in *every* run:

* it only observes - it never touches the exposure, the chunks or the products;
* it never fails a run: any error while drawing or writing is logged (logger
  ``streamdet.quicklook``, level WARNING) and swallowed;
* it is cheap: matplotlib is imported on first use only (Agg canvas, no pyplot, so the
  process's interactive backend is left alone), and it reads one plane of the input
  and the 2-D rate product, never the ramp.

Set ``STREAMDET_QUICKLOOK=off`` (or ``0``/``no``/``false``) to turn it off without
uninstalling it.
"""

from __future__ import annotations

import logging
import os
import uuid
import weakref
from pathlib import Path
from typing import Mapping

from streamdet import hookimpl

log = logging.getLogger("streamdet.quicklook")

#: environment variable that turns the plugin off
ENV_SWITCH = "STREAMDET_QUICKLOOK"
_OFF = {"0", "off", "no", "false"}

#: figure size (inches) and resolution: 1040 x 780 pixels
FIGSIZE = (13.0, 9.75)
DPI = 80

#: exposure -> the chain it is processed with: (step, implementation, package, version)
#: of each step that runs; weak, so a run that fails leaves nothing behind
_chains: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def quicklook_path(products: Mapping[str, Path], base_name: str) -> Path | None:
    """Where the PNG goes: beside the rate product (or any product), named after the
    exposure's base name."""
    product = products.get("rate") or next(iter(products.values()), None)
    if product is None:
        return None
    return Path(product).with_name(f"{base_name}_quicklook.png")


@hookimpl
def streamdet_exposure_started(exposure, chain):
    """Remember which implementation serves each step, for the figure's title."""
    try:
        _chains[exposure] = [(s.name, s.implementation, s.package, s.package_version)
                             for s in chain if not s.skip]
    except Exception as exc:  # pragma: no cover - nothing here should fail
        log.debug("streamdet-quicklook: %s: %s", type(exc).__name__, exc)


@hookimpl
def streamdet_exposure_finished(exposure, products, timings):
    """Write the quick-look PNG; never raise."""
    try:
        served = _chains.pop(exposure, [])
        if os.environ.get(ENV_SWITCH, "").strip().lower() in _OFF:
            return
        meta = exposure.meta
        out = quicklook_path(products, meta.base_name)
        if out is None or "rate" not in products:
            log.debug("streamdet-quicklook: %s has no rate product; nothing drawn", meta.path)
            return
        render_quicklook(meta.path, products["rate"], out, timings, title=meta.base_name,
                         served=served)
        log.debug("streamdet-quicklook: wrote %s", out)
    except Exception as exc:  # an observer must never take the run down
        where = getattr(getattr(exposure, "meta", None), "path", exposure)
        log.warning("streamdet-quicklook: no quick-look for %s: %s: %s",
                    where, type(exc).__name__, exc)


# -- drawing ------------------------------------------------------------------------------
def _read_inputs(uncal: Path, rate: Path):
    import numpy as np
    from astropy.io import fits

    # Level 1B SCI is scaled 16-bit integers, which astropy will not memory-map scaled:
    # map the raw integers and apply the zero point to the one plane needed
    with fits.open(uncal, memmap=True, do_not_scale_image_data=True) as hdul:
        sci = hdul["SCI"]
        ngroups = sci.shape[1]
        last_group = np.array(sci.data[0, ngroups - 1], dtype=np.float32)
        last_group *= np.float32(sci.header.get("BSCALE", 1.0))
        last_group += np.float32(sci.header.get("BZERO", 0.0))
    with fits.open(rate, memmap=False) as hdul:
        rate_sci = np.array(hdul["SCI"].data, dtype=np.float32)
        rate_dq = np.array(hdul["DQ"].data, dtype=np.uint32)
    return last_group, ngroups, rate_sci, rate_dq


def dq_summary(dq) -> dict[str, int]:
    """Pixels carrying each flag (by name), only the flags present, in bit order; plus
    ``GOOD`` for pixels with no flag at all."""
    import numpy as np

    from streamdet.core.dqflags import PIXEL

    dq = np.asarray(dq, dtype=np.uint32)
    counts = {"GOOD": int(np.count_nonzero(dq == 0))}
    present = int(np.bitwise_or.reduce(dq, axis=None)) if dq.size else 0
    for name, bit in PIXEL.items():
        if bit and present & bit:
            counts[name] = int(np.count_nonzero(dq & np.uint32(bit)))
    return counts


def _log_norm(image):
    """Log stretch between the 1st and 99.5th percentiles of the finite values: the one
    streamdet's own quick-look uses (astropy.visualization's ImageNormalize)."""
    from streamdet.quicklook import log_normalization

    return log_normalization(image)


def _image_panel(fig, ax, image, title: str, unit: str) -> None:
    import matplotlib

    cmap = matplotlib.colormaps["gray"].with_extremes(bad="#d62728")  # NaN in red
    shown = ax.imshow(image, origin="lower", cmap=cmap, norm=_log_norm(image),
                      interpolation="nearest")
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.03, label=unit)
    # five ticks evenly spaced in the stretched scale (the default locator crowds them)
    norm = shown.norm
    bar.set_ticks([float(norm.inverse(f)) for f in (0.0, 0.25, 0.5, 0.75, 1.0)])
    bar.ax.yaxis.set_major_formatter("{x:.3g}")
    bar.ax.tick_params(labelsize=8)


def _bars(ax, labels: list[str], values: list[float], title: str, fmt: str, color: str,
          log_scale: bool = False) -> None:
    """Horizontal bars, labelled with their values; a log axis (when asked) only for
    positive values spanning more than a factor 30."""
    positive = [v for v in values if v > 0]
    log_scale = (log_scale and len(positive) == len(values) and len(values) > 1
                 and max(values) > 30 * min(values))
    positions = range(len(labels))
    ax.barh(list(positions), values, color=color)
    ax.set_yticks(list(positions), labels, fontsize=9)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=11)
    if log_scale:
        ax.set_xscale("log")
    top = max(values, default=0)
    for y, value in zip(positions, values):
        ax.text(value, y, " " + fmt.format(value), va="center", fontsize=8)
    if top > 0:
        ax.set_xlim(right=top * (8 if log_scale else 1.25))


def render_quicklook(uncal: Path, rate: Path, out: Path, timings: Mapping[str, float],
                     title: str = "", served: list[tuple[str, str, str, str]] = ()) -> Path:
    """Draw the quick-look figure of ``uncal`` and its ``rate`` product into ``out``
    (written to a temporary name, then renamed). ``served`` lists (step, implementation,
    package, version) of the steps that ran. Raises on any problem; the hook is the one
    that swallows errors."""
    last_group, ngroups, rate_sci, rate_dq = _read_inputs(Path(uncal), Path(rate))

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)  # fixed margins: a layout engine costs 0.5 s
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2], left=0.12, right=0.93, bottom=0.05,
                            top=0.88, wspace=0.4, hspace=0.25)
    _image_panel(fig, fig.add_subplot(grid[0, 0]), last_group,
                 f"Level 1B: integration 1, group {ngroups} (log)", "DN")
    _image_panel(fig, fig.add_subplot(grid[0, 1]), rate_sci, "rate (log; NaN in red)", "DN/s")

    counts = dq_summary(rate_dq)
    flagged = int((rate_dq != 0).sum())
    _bars(fig.add_subplot(grid[1, 0]), list(counts), [float(v) for v in counts.values()],
          f"rate DQ: {flagged} of {rate_dq.size} pixels flagged", "{:.0f}", "#4c72b0",
          log_scale=True)

    steps = [(name, float(sec)) for name, sec in timings.items()]
    total = sum(sec for _, sec in steps)
    _bars(fig.add_subplot(grid[1, 1]), [n for n, _ in steps], [s for _, s in steps],
          f"time per step: {total:.2f} s in all", "{:.3f} s", "#dd8452")

    from streamdet.core.plugins import BUILTIN_PACKAGE

    plugged = [f"{step}={impl} ({pkg} {ver})" for step, impl, pkg, ver in served
               if pkg != BUILTIN_PACKAGE]
    if len(plugged) > 4:
        plugged = plugged[:4] + [f"and {len(plugged) - 4} more"]
    subtitle = "all steps built-in" if not plugged else "plugins: " + ", ".join(plugged)
    fig.suptitle(f"{title}   {rate_sci.shape[0]} x {rate_sci.shape[1]}, "
                 f"{ngroups} groups\n{subtitle}", fontsize=12)

    out = Path(out)
    # a unique hidden name beside the target, created with the process's umask (as the
    # products are), renamed into place so a watcher never sees half a PNG
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as stream:
            fig.savefig(stream, format="png", dpi=DPI)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

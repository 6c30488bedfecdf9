"""What a product records of a run: the steps' status keywords, the references, the
keywords steps add, one HISTORY card per step that ran, and the provenance (which
implementation of which distribution ran each step, with which parameters)."""

from __future__ import annotations

import numpy as np

from . import references as refmod
from .parameters import Parameters
from .products import JWST_MIRI_REFERENCES, JWST_MIRI_STEPS, ProductRecord, ref_keyword
from .step import RateProducer, Step

#: characters of one FITS HISTORY card's text: a longer entry is continued on a second
#: card, and readers look for one card per step
HISTORY_WIDTH = 72


def product_record(chain: list[Step], resolved: dict[str, refmod.Resolved],
                   finished: dict[str, dict], resumed: set[str], upto: str | None = None,
                   before_rate: bool = False, parameters: Parameters | None = None
                   ) -> ProductRecord:
    """What a product records of this run: the status keyword of every step (jwst's
    whole MIRI set; up to step ``upto`` inclusive, or every step before the rate
    producer with ``before_rate``), the references, the keywords of the steps that ran,
    HISTORY, and the provenance (implementations, parameters that differ from their
    defaults). Steps done in the input keep the input's keywords."""
    names = [s.name for s in chain]
    steps = {s.name: s for s in chain}
    # jwst's steps that streamdet's chain lacks go after the chain step they follow in
    # jwst's order, so that a cut after a step keeps exactly what jwst's would
    order: list[str] = []
    jwst_names = [n for n, _ in JWST_MIRI_STEPS]
    for name in names:
        order.append(name)
    for i, (name, _) in enumerate(JWST_MIRI_STEPS):
        if name in names:
            continue
        before = [n for n in jwst_names[:i] if n in order]
        order.insert(order.index(before[-1]) + 1 if before else 0, name)
    if upto is not None:
        order = order[:order.index(upto) + 1]
    elif before_rate:
        producer = next(s.name for s in reversed(chain) if isinstance(s, RateProducer))
        order = order[:order.index(producer)]
    jwst_keyword = dict(JWST_MIRI_STEPS)
    keywords: dict[str, object] = {}
    defaults: dict[str, object] = {}
    for reftype, res in resolved.items():
        keywords[ref_keyword(reftype)] = res.header_value
    contexts = {r.context for r in resolved.values() if r.context}
    if contexts:
        keywords["CRDS_CTX"] = sorted(contexts)[0]
        keywords["CRDS_VER"] = refmod.crds_version()
    history, log, provenance_steps = [], [], []
    for name in order:
        step = steps.get(name)
        if step is None:
            defaults[jwst_keyword[name]] = "SKIPPED"
            continue
        if name in resumed:
            status = "DONE IN INPUT"
        else:
            status = "SKIPPED" if step.skip else "COMPLETE"
            # jwst's steps are recorded run or not, as jwst does; a step jwst lacks (a
            # plugin's) only when it ran, so the default set is exactly jwst's
            if step.status_keyword and (name in jwst_keyword or not step.skip):
                keywords[step.status_keyword] = status
            if not step.skip:
                keywords.update(finished.get(name, {}))  # a step's own keywords win
                history.append(history_line(step))
        changed = _changed_params(step)
        provenance_steps.append({"step": name, "implementation": step.implementation,
                                 "package": str(step.package),
                                 "package_version": str(step.package_version),
                                 "status": status, "reason": step.skip_reason,
                                 "parameters": changed})
        log.append(f"{name}: {status.lower()}, {step.implementation} ({step.package} "
                   f"{step.package_version})"
                   + (f": {step.skip_reason}" if step.skip_reason else "")
                   + (f"; parameters differing from defaults: {changed}" if changed else ""))
    for keyword in JWST_MIRI_REFERENCES:
        if keyword not in keywords:
            defaults[keyword] = refmod.NA
    import streamdet  # noqa: PLC0415

    if parameters is not None:
        # the CRDS parameter references applied, one HISTORY card each, and where every
        # value that differs from a default came from
        history += [_cut(f"streamdet: {p.reftype}={p.header_value}", HISTORY_WIDTH)
                    for p in parameters.pars]
        log += [f"parameter {line}" for line in parameters.lines()]
    provenance = {"software": "streamdet", "version": streamdet.__version__,
                  "steps": provenance_steps,
                  "parameter_sources": [] if parameters is None else [
                      {"step": p.step, "name": p.name, "value": _plain(p.value),
                       "source": p.source, "origin": p.origin} for p in parameters.settings],
                  "references": {r: {"path": res.path or "N/A", "source": res.source}
                                 for r, res in resolved.items()}}
    return ProductRecord(keywords, history, provenance, log, defaults)


def _plain(value):
    """``value`` as ASDF can store it (numbers, strings, booleans, lists, None)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _changed_params(step: Step) -> dict[str, object]:
    """The step's parameters whose values differ from the declared defaults."""
    spec = step.all_params()
    values = dict(step.params, skip=getattr(step, "skip_requested", step.skip))
    out = {}
    for name, value in values.items():
        if name in spec and value != spec[name].default:
            out[name] = value.item() if isinstance(value, np.generic) else value
    return out


def history_line(step: Step) -> str:
    """The HISTORY record of a step that ran, one card long:
    ``streamdet: STEP=IMPLEMENTATION (DISTRIBUTION VERSION)``.

    Beyond :data:`HISTORY_WIDTH` characters the distribution name and version give way
    first, sharing the room left (the shorter keeps its length if it takes no more than
    half; a cut is marked ``...``), as the step and implementation are what readers look
    for; a step and implementation too long for even that cut the line itself."""
    head = f"streamdet: {step.name}={step.implementation}"
    package, version = str(step.package), str(step.package_version)
    room = HISTORY_WIDTH - len(head) - len(" ( )")  # for the distribution and version
    if len(package) + len(version) > room >= 2 * len("..."):
        half = room // 2
        if len(version) <= half:
            package = _cut(package, room - len(version))
        elif len(package) <= half:
            version = _cut(version, room - len(package))
        else:
            package, version = _cut(package, room - half), _cut(version, half)
    return _cut(f"{head} ({package} {version})", HISTORY_WIDTH)


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` (>= 3) characters, a cut marked ``...``."""
    return text if len(text) <= width else text[:width - 3] + "..."

"""The step contract: everything a step author needs, built-in or third-party.

This module and :mod:`streamdet.core.hookspecs` (how a plugin hands its steps to
streamdet) are the whole contract; the tutorial is ``docs/plugins.md``. The engine
(``core/engine.py``) relies on nothing that is not written here.

Lifecycle of one exposure
-------------------------
1. **Declare.** A :class:`Step` subclass sets class attributes: ``name`` (an existing
   step's name replaces it when chosen with ``--use NAME=IMPL``; a new name with
   ``after``/``before`` inserts a step), ``implementation``, ``reftypes``,
   ``params_spec`` (:class:`Param`), ``granularity``, ``halo``... and the capabilities
   below. A step name's place is that of its first implementation declaring one (for a
   built-in step, the built-in's: a replacement keeps it); a new step goes right next
   to its anchor (several at one anchor keep their registration order); one with an
   unknown anchor or none is left out as broken. A replacement is used only when chosen
   (``--use`` or the ``implementation_parameter``); two plugins giving the same new name
   need ``--use``. The engine makes **one instance per exposure**, with the parameters
   validated into ``self.params`` (``skip`` taken out into ``self.skip``).
2. **Resume.** A ramp that went through steps already (``S_*`` COMPLETE or SKIPPED in a
   saved RampModel) skips them; :class:`ExposureState` then takes what the input
   records (``average_dark_current`` from its AVDRKCUR).
3. **Prepare.** ``prepare(meta, refs, pixeldq)`` once per step not skipped, in chain
   order, before any data: read references (cut to the exposure), OR reference-only
   pixel flags into the exposure-wide ``pixeldq``, leave values for later steps in
   ``meta.state`` (:class:`ExposureState`), return a reason to skip or None. A reference
   type resolved N/A skips the step before ``prepare`` (``optional_reftypes`` do not).
4. **Pre-pass** (``prepass_exposure = True``): :meth:`Step.prepass` reads the input's
   integrations one at a time before the first pass (:class:`InputRamp`).
5. **Integration pass.** Every integration, in bands of rows when every step of the pass
   is ``GROUP``, whole otherwise, goes through the steps before the first ``EXPOSURE``
   step; the steps of the band pass that follows :meth:`Step.survey` each piece as it
   leaves. The result goes to a scratch file.
6. **Band pass.** Bands of rows spanning every integration (plus ``halo`` rows each
   side), read back from the scratch file, go through the first ``EXPOSURE`` step and
   the rest; the last step, a :class:`RateProducer`, returns a :class:`RateResult` for
   the band's core rows. An ``INTEGRATION`` step after an ``EXPOSURE`` step starts an
   integration pass of its own (each integration read back whole from the band pass's
   output), and the next ``EXPOSURE`` step another band pass.
7. **Re-run protocol** (``EXPOSURE`` steps, all optional; memory stays one band plus
   what the step keeps):

   * ``frame_passes() -> n`` (asked once, after ``prepare``): before the band pass
     proper, ``n`` extra band passes run through the steps up to and including this one,
     with ``gather_halo(stage)`` more rows of halo; after this step's ``process`` each
     band goes to ``gather(chunk, stage, context)``, and after each extra pass
     ``between_passes(stage, context)`` does the frame-wide work (jump's shower search
     on whole difference planes). The bands of the pass proper start again from the
     pass's input and see what ``between_passes`` concluded.
   * ``rerun_rows()`` (once, after all bands of a pass): row ranges whose results a
     frame-wide verdict known only at the end invalidates; the engine runs those bands
     again, from the same input, through every step of the pass (in an extra pass too:
     up to the gathering step, before ``between_passes``). The step's state from the
     first round is there.
   * ``needs_whole_exposure = True``: the band pass holding this step is one band of
     every row, at the memory cost of the whole ramp.

   **Fused pass.** When every step of the integration pass is a ``recomputable`` GROUP
   step and every step of the (only) band pass that surveys declares
   ``survey_with_bands``, no copy of the integration pass's output is kept: the band
   pass reads each band from the input and runs the integration pass's steps on it
   first (so they may see the same rows again, in several bands' halos and in re-runs,
   all integrations at once). Each band is surveyed just before the band's steps run,
   which then work with the survey as far as it has got; after every band has been
   seen once, ``survey_complete()`` says whether what the step did so far stands. If
   a step says no, every band is done again, with the survey whole.
   When a surveyor cannot survey band by band (refpix needs every row of an
   integration) and the copy would go to a file, a pass for the surveys alone comes
   first, for those surveyors (the others survey with the bands, as above). If every
   one of them names the columns whose data it reads (``survey_columns``), that pass
   computes those columns only (refpix's eight reference columns): every step of the
   pass runs on them and the neighbours its and the later steps' ``halo`` reach, when
   every step is ``column_local``; otherwise the ``data_only`` steps run on those
   columns alone, provided no step after one of them reads the data (``reads_data``).
8. **Products.** ``on_products`` steps (after the rate producer) get
   ``process_products(rate, rateints)``; then ``finish()`` of every step that ran gives
   its header keywords, and ``extra_products()`` writers run once rate and rateints are
   in place. Each product records every step's ``status_keyword``, one HISTORY card per
   step that ran (``streamdet: STEP=IMPLEMENTATION (DISTRIBUTION VERSION)``, the
   distribution's metadata filling ``package``/``package_version``) and, in its ASDF
   extension, each step's status, reason and parameters differing from their defaults.

Rules for ``process``
---------------------
* Modify the :class:`Chunk` **in place**: ``data`` float32 and ``groupdq`` uint8
  ``[nints, ngroups, nrows, nx]``, ``pixeldq`` uint32 ``[nrows, nx]``. Shapes vary with the
  granularity: a ``GROUP`` step must not assume one.
* ``chunk.core`` are the rows whose results are kept; the rest is halo, read afresh for
  each band, so what a step writes there is discarded. ``pixeldq`` is a view of the
  exposure-wide flags: in the band pass write it in the core rows only.
* ``thread_safe = True`` lets ``process``, ``survey`` and ``gather`` run concurrently on
  disjoint rows (``--threads``); a pass is serial unless every step in it says so.
  Results must not depend on the band sizes nor on the number of threads.
* Flags: the names of :mod:`streamdet.core.dqflags` (jwst's values).
* Errors: raise :class:`~streamdet.core.errors.BadInputError` (one line naming the file
  and what is wrong: exit 2) when the input is at fault; anything else is an internal
  error (exit 1).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from .errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from .exposure import ExposureMeta
    from .products import CubeStore, RateArrays
    from .references import References


class Granularity(str, enum.Enum):
    """How much of the exposure a step must see at once."""

    #: pixel-local and integration-local: any chunk will do.
    GROUP = "group"
    #: all rows and groups of one integration at once (e.g. emicorr's frame statistics).
    #: After an EXPOSURE step such a step gets an integration pass of its own.
    INTEGRATION = "integration"
    #: all integrations of a pixel at once (e.g. jump's median over every difference).
    EXPOSURE = "exposure"


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One step parameter: its type, default, and what values are allowed."""

    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    min: float | None = None
    max: float | None = None
    #: None is a value too (jwst's ``integer(default=None)``); given as text: "None"
    optional: bool = False

    def coerce(self, step: str, name: str, value: Any) -> Any:
        """Return ``value`` as this parameter's type, or raise a one-line BadInputError."""
        where = f"parameter {step}.{name}"
        if self.optional and (value is None or (isinstance(value, str)
                                                and value.strip().lower() in ("none", "null"))):
            return None
        try:
            if self.type is bool:
                if isinstance(value, bool):
                    out = value
                elif isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                    out = value.strip().lower() in _TRUE
                elif isinstance(value, (int, np.integer)) and value in (0, 1):
                    out = bool(value)
                else:
                    raise ValueError
            elif self.type is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                out = int(value)
            elif self.type is float:
                if isinstance(value, bool):
                    raise ValueError
                out = float(value)
            else:
                out = self.type(value)
        except (TypeError, ValueError):
            raise BadInputError(
                f"{where}: {value!r} is not a valid {self.type.__name__}") from None
        if self.choices is not None and out not in self.choices:
            raise BadInputError(f"{where}: {out!r} is not one of {list(self.choices)}")
        if self.min is not None and out < self.min:
            raise BadInputError(f"{where}: {out!r} is below the minimum {self.min}")
        if self.max is not None and out > self.max:
            raise BadInputError(f"{where}: {out!r} is above the maximum {self.max}")
        return out


@dataclass
class Chunk:
    """A slab of the exposure's ramp that steps modify in place.

    ``data`` float32 and ``groupdq`` uint8 are ``[nints, ngroups, nrows, nx]``;
    ``pixeldq`` uint32 ``[nrows, nx]`` is a view of the exposure-wide pixel flags.
    ``int_index`` holds the absolute (INTSTART-aware, 0-based) integration number of each
    plane of axis 0. ``rows`` are the exposure rows covered, ``core`` the part of the
    chunk the step's results are kept for (the rest is halo: neighbours lent for context).
    ``columns``: None (every column), or the exposure columns the last axis holds, in
    order; only ``data_only`` and ``column_local`` steps get such a chunk (see
    ``Step.column_local``), and must then take their references' values of those
    columns.
    """

    data: np.ndarray
    groupdq: np.ndarray
    pixeldq: np.ndarray
    int_index: np.ndarray
    rows: slice
    core: slice = field(default_factory=lambda: slice(None))
    columns: np.ndarray | None = None

    @property
    def nrows(self) -> int:
        return self.data.shape[2]


@dataclass(slots=True)
class ExposureState:
    """Exposure-level values one step hands to later ones, as jwst keeps them on its
    model: ``meta.state`` during a run. Each field has one writer; readers get None when
    that step did not run (skipped, or another implementation). A plugin's values for
    its own use stay on its step instance; a value shared between steps gets a field
    here (an unknown name is an AttributeError, not a new key)."""

    #: e-/s per pixel, float32 ``[ny, nx]``: the dark current dark_current subtracted
    #: (its reference's AVDRKCUR, else its own estimate), for the Poisson variance of the
    #: rate producers (ramp_fit, likely) and the saved ramps' AVDRKCUR extension. Written
    #: in dark_current's ``prepare``; from a resumed ramp's AVDRKCUR when dark_current was
    #: done in the input.
    average_dark_current: np.ndarray | None = None
    #: bool ``[nints, ngroups]``: groups DO_NOT_USE in every pixel once jump's large-event
    #: searches have run (a snowball core set SATURATED takes DO_NOT_USE away), for
    #: ramp_fit's leading/final group discard. Written by jump's ``between_passes``.
    jump_dnu_everywhere: np.ndarray | None = None


@dataclass(frozen=True)
class InputRamp:
    """What :meth:`Step.prepass` reads: the input's ramp as the file holds it, before
    any step has run, one integration at a time."""

    #: integrations in the file (file-local numbers ``0 .. nints - 1``; absolute ones
    #: are ``meta.intstart - 1`` more)
    nints: int
    #: ``read(i)``: integration ``i`` as fresh arrays of its own (yours to modify):
    #: ``(data float32 [ngroups, ny, nx], groupdq uint8 [ngroups, ny, nx])``
    read: Callable[[int], tuple[np.ndarray, np.ndarray]]


@dataclass
class RateResult:
    """What a :class:`RateProducer`'s ``process`` returns: the rates of the chunk's core
    rows (``chunk.core``), which the engine puts into the rate products."""

    #: the exposure's rate, ``[ncore, nx]`` arrays
    rate: "RateArrays"
    #: one rate per integration, ``[nints, ncore, nx]`` arrays
    rateints: "RateArrays"


class Step:
    """Base class of every step implementation, built-in or third-party.

    Subclasses set the class attributes below and override :meth:`process` (and
    usually :meth:`prepare`); see the module's text for when each is called. Parameters
    arrive validated as ``self.params``.
    """

    # -- identity and place in the chain -------------------------------------------------

    #: the step name the chain knows (``"jump"``); several implementations may share it.
    name: ClassVar[str]
    #: this implementation's name, chosen with ``--use STEP=IMPL``.
    implementation: ClassVar[str] = "builtin"
    #: CRDS reference types the step reads (lower case, as CRDS names them).
    reftypes: ClassVar[tuple[str, ...]] = ()
    #: reference types the step uses when there is one (``--override`` or CRDS) and does
    #: without otherwise: N/A or no CRDS match does not skip the step. Found in
    #: ``refs.resolved`` like the others.
    optional_reftypes: ClassVar[tuple[str, ...]] = ()
    #: parameter declarations; every step also has ``skip``.
    params_spec: ClassVar[dict[str, Param]] = {}
    #: a parameter whose value chooses the implementation, as jwst's
    #: ``ramp_fit.algorithm`` does: ``(parameter, {value: implementation})``. Setting it
    #: is the same choice as ``--use``; the built-in implementation's declaration counts.
    implementation_parameter: ClassVar[tuple[str, dict[str, str]] | None] = None
    #: what to install for an implementation this package does not provide (the message
    #: when the parameter above asks for it and it is missing): ``{implementation: text}``
    implementation_sources: ClassVar[dict[str, str]] = {}
    #: in the chain but skipped unless ``--set NAME.skip=false``
    default_skip: ClassVar[bool] = False
    #: for a new step: the step it follows (or precedes) in the chain.
    after: ClassVar[str | None] = None
    before: ClassVar[str | None] = None
    #: the primary-header keyword recording this step's status (``S_JUMP``, 8 characters
    #: at most): COMPLETE or SKIPPED; a step jwst lacks records it only when it ran.
    status_keyword: ClassVar[str | None] = None

    # -- what the engine must give it -----------------------------------------------------
    granularity: ClassVar[Granularity] = Granularity.GROUP
    #: rows of neighbours needed above and below each chunk (band chunks only).
    halo: ClassVar[int] = 0
    #: True when ``process`` and ``survey`` may run concurrently on disjoint rows
    #: (``--threads``); the run stays serial unless every active step says so.
    thread_safe: ClassVar[bool] = False
    #: EXPOSURE steps: every chunk must be the whole exposure (one band of every row
    #: through every integration), at the memory cost of holding it all; the other
    #: steps of the same band pass then see that one band too.
    needs_whole_exposure: ClassVar[bool] = False
    #: GROUP steps: ``process`` may run again on rows it has seen, from the same input,
    #: with the same outcome (state kept per row, or ORed), so the engine may recompute
    #: the step's output rather than keep a copy of it (the fused pass).
    recomputable: ClassVar[bool] = False
    #: EXPOSURE steps that ``survey``: the survey may come band by band, each band just
    #: before ``process`` sees it (the fused pass); ``survey`` must then be idempotent
    #: (seeing a piece again changes nothing) and ``process`` must note what its band's
    #: results depend on, for :meth:`survey_complete`.
    survey_with_bands: ClassVar[bool] = False
    #: GROUP steps whose ``process`` changes ``chunk.data`` only, each pixel from its own
    #: samples, flags and references: in a pass made for the surveys alone whose
    #: surveyors read the data of a few columns (``survey_columns``), the engine runs the
    #: step on those columns only (``chunk.columns``).
    data_only: ClassVar[bool] = False
    #: GROUP steps whose ``process`` computes each pixel from its own samples, flags and
    #: references and those of the pixels within ``halo`` rows and columns of it (a
    #: ``data_only`` step is one): in a pass made for the surveys alone, whose surveyors
    #: read the data of a few columns, the engine may run the step on those columns and
    #: their neighbours only (``chunk.columns``); the band pass then runs it again on
    #: every column. Such a step must take its references' values of those columns and
    #: keep no statistics from a chunk with ``columns``.
    column_local: ClassVar[bool] = False
    #: False when ``process``'s outcome does not depend on ``chunk.data`` (flags from
    #: flags and references): such a step may follow a ``data_only`` step run on some
    #: columns only.
    reads_data: ClassVar[bool] = True
    #: :meth:`prepass` sees every integration of the input before the first pass (a fit
    #: over the whole exposure that the first integration's correction needs: emicorr).
    prepass_exposure: ClassVar[bool] = False
    #: a step placed after the rate producer, working on the rate products rather than
    #: the ramp: the engine calls ``process_products(rate, rateints)`` once the band
    #: pass is over (``rate`` RateArrays 2-D; ``rateints`` RateArrays or CubeStore, see
    #: :func:`streamdet.core.products.rateints_by_integration`), before writing them.
    on_products: ClassVar[bool] = False
    #: filled by the plugin manager: the distribution that provided the class.
    package: ClassVar[str] = "?"
    package_version: ClassVar[str] = "?"

    def __init__(self, params: dict[str, Any] | None = None):
        self.params = self.validate_params(params or {})
        self.skip: bool = self.params.pop("skip")
        #: why the step did not run (None when it ran).
        self.skip_reason: str | None = "skipped by default" if self.skip else None

    @classmethod
    def all_params(cls) -> dict[str, Param]:
        return {"skip": Param(bool, cls.default_skip, "do not run this step"), **cls.params_spec}

    @classmethod
    def validate_params(cls, given: dict[str, Any]) -> dict[str, Any]:
        from .jwstparams import ENGINE_PARAMS, refuse_unimplemented, threads_for

        spec = cls.all_params()
        given = dict(given)
        for name in sorted(set(given) - set(spec)):
            if cls.name in ENGINE_PARAMS.get(name, ()):  # served by the engine (threads)
                try:
                    threads_for(given.pop(name), 1)
                except BadInputError as exc:
                    raise BadInputError(f"parameter {cls.name}.{exc}") from None
            elif refuse_unimplemented(cls.name, name, given[name]):
                del given[name]  # jwst's default: the behaviour is the same
        unknown = sorted(set(given) - set(spec))
        if unknown:
            raise BadInputError(
                f"step {cls.name!r} has no parameter {unknown[0]!r} "
                f"(it has: {', '.join(sorted(spec))})")
        return {name: (p.coerce(cls.name, name, given[name]) if name in given else p.default)
                for name, p in spec.items()}

    # -- called by the engine -------------------------------------------------------------
    def prepare(self, meta: "ExposureMeta", refs: "References", pixeldq: np.ndarray) -> str | None:
        """Read references (cut to the exposure: ``refs.array``, ``refs.block``,
        ``refs.dq``, ``refs.header``, ``refs.path``, ``refs.resolved``), apply
        reference-only pixel flags to the exposure-wide ``pixeldq`` (uint32 ``[ny, nx]``),
        leave values for later steps in ``meta.state`` (:class:`ExposureState`) and
        return a reason to skip, or None to run."""
        return None

    def prepass(self, ramp: InputRamp) -> None:
        """``prepass_exposure`` steps: see every integration of the input (as the file
        holds it: the steps before this one have not run on it) before the first pass,
        one at a time (memory: what the step keeps). Called once, after every
        ``prepare``, on the engine's thread."""

    def survey(self, chunk: Chunk) -> None:
        """EXPOSURE steps: see every piece of the exposure as the first pass leaves it.

        A piece is one integration, whole or a band of its rows (``chunk.core`` are the
        rows that belong to it); accumulate over pieces, do not assign. With threads,
        pieces may arrive concurrently (see ``thread_safe``)."""

    def survey_columns(self, nx: int) -> np.ndarray | None:
        """The exposure columns whose ``chunk.data`` :meth:`survey` reads (of ``nx``):
        None, every column; an empty array, none (a survey of the flags)."""
        return None

    def survey_complete(self) -> bool:
        """``survey_with_bands`` steps, in a fused pass, once every band has been
        surveyed (and processed, or gathered in an extra pass): True when every band
        was processed with what the whole survey gives; False has every band done again
        (the step then uses the whole survey). Called once."""
        return True

    def process(self, chunk: Chunk) -> Any:
        """Modify ``chunk`` in place (see the module's rules). Once per chunk; a
        :class:`RateProducer` returns a :class:`RateResult`, other steps None."""
        raise NotImplementedError

    def process_products(self, rate: "RateArrays", rateints: "RateArrays | CubeStore") -> None:
        """``on_products`` steps: modify the rate products in place."""
        raise NotImplementedError

    def rerun_rows(self) -> list[slice]:
        """EXPOSURE steps: after the band pass, the bands (by their core rows) whose
        results must be recomputed because a frame-wide statistic the step only knows
        at the end disagrees with what the band saw; the engine re-runs the band pass
        on them. Called once."""
        return []

    def frame_passes(self) -> int:
        """EXPOSURE steps whose band results need frame-wide work first (jump's shower
        search looks at whole difference planes): how many extra band passes, each run
        up to and including this step and followed by :meth:`between_passes`, the
        engine makes before the band pass proper. Called after ``prepare``; 0: none."""
        return 0

    def gather_halo(self, stage: int) -> int:
        """Rows of context :meth:`gather` needs beyond ``halo`` in extra pass ``stage``."""
        return 0

    def gather(self, chunk: Chunk, stage: int, context: "FrameContext") -> None:
        """In extra pass ``stage``: see the chunk right after this step's ``process``
        (the rows ``chunk.core`` are this piece's; the rest is context). With threads,
        pieces may arrive concurrently."""

    def between_passes(self, stage: int, context: "FrameContext") -> None:
        """After extra pass ``stage``: the frame-wide work on what :meth:`gather` kept.
        The next passes' ``process`` calls see its results."""

    def finish(self) -> dict[str, Any]:
        """Primary-header keywords this step contributes (besides its status)."""
        return {}

    def extra_products(self) -> dict[str, Callable[[Any, Any, Any], None]]:
        """Products beyond rate and rateints this step writes once the passes are done
        (ramp_fit's ``fitopt``): kind -> ``write(path, record, source)``, ``record`` the
        run's :class:`~streamdet.core.products.ProductRecord` (keywords, HISTORY,
        provenance) and ``source`` the input's metadata
        (:class:`~streamdet.core.products.InputMetadata`: never reopen the input, which
        may have been replaced since it was checked). Asked after ``prepare``; the engine
        names the files as the rate's, checks that they may be written and calls the
        writers after the rate products are in place."""
        return {}

    def describe(self) -> str:
        return f"{self.name} ({self.implementation}, {self.package} {self.package_version})"


class RateProducer(Step):
    """A step that makes the rate products (the built-in ``ramp_fit``, ``likely``).

    The last step of the ramp chain that runs must be one (``on_products`` steps may
    follow): skipping it is refused, and a chain ending otherwise is a plugin error. It
    runs in the last band pass, whatever its granularity (not ``INTEGRATION`` after an
    ``EXPOSURE`` step), and its ``process`` returns a :class:`RateResult` for the core rows.
    """

    def process(self, chunk: Chunk) -> RateResult:
        raise NotImplementedError


@dataclass
class FrameContext:
    """What the engine lends a step's :meth:`Step.between_passes`: a directory for
    scratch files (None: the system's) and a ``map(fn, items)`` that runs on the
    engine's threads (results in order)."""

    scratch_dir: Any
    map: Callable[[Callable, Any], Any]

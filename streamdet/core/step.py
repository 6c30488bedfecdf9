"""What a step is: its declaration (name, references, parameters, granularity) and the
chunk of ramp it works on.

A step implementation subclasses :class:`Step`. The engine makes one instance per
exposure, calls :meth:`Step.prepare` once, :meth:`Step.process` once per chunk and
:meth:`Step.finish` once; steps of granularity ``EXPOSURE`` may also define
:meth:`Step.survey` to see every integration in the engine's first pass.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from .errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from .exposure import ExposureMeta
    from .references import References


class Granularity(str, enum.Enum):
    """How much of the exposure a step must see at once."""

    #: pixel-local and integration-local: any chunk will do.
    GROUP = "group"
    #: all rows and groups of one integration at once (e.g. emicorr's frame statistics).
    #: After an EXPOSURE step such a step gets a pass of its own: each integration is
    #: read back whole from the band pass's output (see core/engine.py ``stages``).
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
    """

    data: np.ndarray
    groupdq: np.ndarray
    pixeldq: np.ndarray
    int_index: np.ndarray
    rows: slice
    core: slice = field(default_factory=lambda: slice(None))

    @property
    def nrows(self) -> int:
        return self.data.shape[2]


class Step:
    """Base class of every step implementation, built-in or third-party.

    Subclasses set the class attributes below and override :meth:`process` (and
    usually :meth:`prepare`). Parameters arrive validated as ``self.params``.
    """

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
    granularity: ClassVar[Granularity] = Granularity.GROUP
    #: rows of neighbours needed above and below each chunk (band chunks only).
    halo: ClassVar[int] = 0
    default_skip: ClassVar[bool] = False
    #: for a new step: the step it follows (or precedes) in the chain.
    after: ClassVar[str | None] = None
    before: ClassVar[str | None] = None
    #: the primary-header keyword recording this step's status (``S_JUMP``).
    status_keyword: ClassVar[str | None] = None
    #: True when ``process`` and ``survey`` may run concurrently on disjoint rows
    #: (``--threads``); the run stays serial unless every active step says so.
    thread_safe: ClassVar[bool] = False
    #: EXPOSURE steps: every chunk must be the whole exposure (one band of every row
    #: through every integration), at the memory cost of holding it all; the other
    #: steps of the same band pass then see that one band too.
    needs_whole_exposure: ClassVar[bool] = False
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
        """Read references (cut to the exposure), apply reference-only pixel flags to
        the exposure-wide ``pixeldq``, and return a reason to skip, or None to run."""
        return None

    def survey(self, chunk: Chunk) -> None:
        """EXPOSURE steps: see every piece of the exposure as the first pass leaves it.

        A piece is one integration, whole or a band of its rows (``chunk.core`` are the
        rows that belong to it); accumulate over pieces, do not assign. With threads,
        pieces may arrive concurrently (see ``thread_safe``)."""

    def process(self, chunk: Chunk) -> Any:
        raise NotImplementedError

    def process_products(self, rate, rateints) -> None:
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


@dataclass
class FrameContext:
    """What the engine lends a step's :meth:`Step.between_passes`: a directory for
    scratch files (None: the system's) and a ``map(fn, items)`` that runs on the
    engine's threads (results in order)."""

    scratch_dir: Any
    map: Callable[[Callable, Any], Any]


#: signature of a rate producer's result, see streamdet.plugins.ramp_fit
RateSink = Callable[[slice, Any, Any], None]

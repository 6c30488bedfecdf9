"""The hook specifications: the one contract shared by built-in and third-party steps.

A plugin is any module (or object) registered under the entry-point group
``streamdet.steps`` that implements some of these hooks, marked with
``streamdet.hookimpl``. Built-in steps in ``streamdet.plugins`` use exactly the same
hooks and the same entry-point group.

Three kinds of plugin use them:

* **replace** a step: return a :class:`~streamdet.core.step.Step` subclass whose
  ``name`` is an existing step (``ramp_fit``) and whose ``implementation`` is a new
  name (``likely``); the user selects it with ``--use ramp_fit=likely``.
* **insert** a step: return a Step subclass with a new ``name`` and an ``after`` (or
  ``before``) naming the step it is placed next to.
* **observe**: implement only the event hooks below.

The rules of steps are :mod:`streamdet.core.step`'s.

The event (observer) hooks are called one implementation at a time
(:class:`streamdet.core.plugins.Observers`): one that raises is reported once per run as a
warning naming its plugin, and the other observers and the run go on. An installed
observer takes part in every run of its Python environment, so it must never modify the
exposure, a chunk, a step or a product; catch and log its own errors (the warning is a
last resort: the hook is still called for later events); import heavy libraries lazily;
keep per-exposure state keyed by the ``exposure`` object (a ``weakref.WeakKeyDictionary``),
as the daemon runs many exposures in one process. Neither ``started`` nor ``finished``
is called for an exposure that fails before it; ``finished`` not when processing fails.

A plugin that cannot be used is left out and reported (``plugin package NAME: ...``) by
``streamdet steps``, ``process`` and ``plugins``, the others staying as they are: its
module raises on import; ``streamdet_steps()`` raises or returns something that is not a
Step subclass, a class without ``name``, or a ``Param`` whose default is not of its
type; a new step anchored to an unknown step, or to none.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("streamdet")


@hookspec
def streamdet_steps():
    """Return a list of :class:`~streamdet.core.step.Step` subclasses this plugin provides.

    Each class declares its step ``name``, its ``implementation`` name, the reference
    types it needs, its parameters, its granularity and, for a new step, where it goes
    in the chain (``after``/``before``). Called once when the plugin manager is built.
    """


@hookspec
def streamdet_run_steps(config):
    """Return Step subclasses that one run adds to the chain, decided by its
    configuration (a :class:`~streamdet.core.engine.RunConfig`), not by what is installed.

    streamdet's stpipe adapter uses it for ``--pre-hook``/``--post-hook`` and
    ``--use STEP=stpipe:pkg.Class``. The classes follow the rules of
    :func:`streamdet_steps` (a new ``name`` with ``after``/``before``, or a known
    ``name`` with an ``implementation`` of its own); raise
    :class:`~streamdet.core.errors.BadInputError` for a configuration that names
    something unusable. Called when the chain of a run is built.
    """


@hookspec
def streamdet_exposure_started(exposure, chain):
    """An exposure is about to be processed.

    ``exposure`` is the :class:`~streamdet.core.exposure.Exposure` (``exposure.meta``
    holds the header values); ``chain`` is the list of configured step instances in
    order, skipped ones included (``step.skip`` tells).
    """


@hookspec
def streamdet_step_finished(exposure, step, chunk, seconds):
    """``step`` has finished on one ``chunk`` (integrations and rows it covered) in ``seconds``.

    The chunk's arrays are the engine's working buffers, reused for later chunks once the
    hook returns: copy what you keep."""


@hookspec
def streamdet_exposure_finished(exposure, products, timings):
    """The products are written.

    ``products`` maps product kind (``"rate"``, ``"rateints"``, ``"ramp"``) to its path;
    ``timings`` maps step name to total seconds spent in it.
    """

"""Importing a package's submodules without running the package's ``__init__`` at once.

The products need three classes of ``stdatamodels.jwst.datamodels`` (ImageModel,
CubeModel, RampModel). Importing any of their modules the ordinary way first runs the
package's ``__init__``, which imports all ~130 JWST models, among them the WCS reference
models (astropy.modeling); and their common base imports ``astropy.nddata.bitmask``, whose
package ``__init__`` imports all of astropy.nddata (scipy.sparse, astropy.table,
astropy.coordinates, astropy.wcs). None of that is used to build or write a product, and
it is about 0.3 s of CPU in every one-shot run.

:func:`defer_package_init` puts a package into ``sys.modules`` made from its real spec
(``__path__``, ``__file__``...) without executing its ``__init__``: its submodules import
as usual, and the ``__init__`` runs, complete and once, the first time anyone asks the
package for a name it does not have yet (``from astropy.nddata import NDData``,
``datamodels.open``, ``__all__``...). So every other user of these packages in the same
process sees them as usual, only later."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading

_lock = threading.Lock()


def defer_package_init(name: str) -> None:
    """Make ``name`` (a package not yet imported) importable without its ``__init__``
    running until one of its own names is first needed. Nothing happens when the package
    is imported already, or is not a plain source package."""
    with _lock:
        if name in sys.modules:
            return
        parent, _, child = name.rpartition(".")
        parent_module = importlib.import_module(parent) if parent else None
        spec = importlib.util.find_spec(name)
        if (spec is None or spec.submodule_search_locations is None or spec.loader is None
                or not hasattr(spec.loader, "exec_module")):
            return
        module = importlib.util.module_from_spec(spec)
        running = threading.RLock()
        state = {"done": False, "in_progress": False}

        def __getattr__(attr: str):
            with running:  # another thread's first use waits for the __init__ to finish
                if state["in_progress"]:  # asked by the __init__ itself (``from . import x``)
                    raise AttributeError(f"module {name!r} has no attribute {attr!r}")
                if not state["done"]:
                    state["in_progress"] = True
                    try:
                        spec.loader.exec_module(module)
                        state["done"] = True
                    finally:
                        state["in_progress"] = False
                        if module.__dict__.get("__getattr__") is __getattr__:
                            del module.__dict__["__getattr__"]
                        if not state["done"]:  # failed: the next use tries again
                            module.__dict__["__getattr__"] = __getattr__
            return getattr(module, attr)  # the package's own lookup from now on

        module.__getattr__ = __getattr__
        sys.modules[name] = module
        if parent_module is not None:
            setattr(parent_module, child, module)

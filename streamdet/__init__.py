"""streamdet: JWST MIRI Level 1B ramps to rate images, streamed through a chain of step
plugins at parity with jwst's calwebb_detector1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core.plugins import hookimpl

__version__ = "0.1.0"
__all__ = ["process", "hookimpl", "__version__"]


def process(path: str | Path, output_dir: str | Path | None = None, *,
            steps: dict[str, dict[str, Any]] | None = None, use: dict[str, str] | None = None,
            overrides: dict[str, str] | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Process one Level 1B file; return ``{"rate": path, "rateints": path}``.

    ``steps`` maps step name to parameters (``{"jump": {"rejection_threshold": 5}}``,
    ``{"firstframe": {"skip": False}}``), ``use`` picks implementations, ``overrides``
    maps reference type to a path or ``"N/A"``. As in jwst, ``{"jump": {"post_hooks":
    ["snowblind.SnowblindStep"]}}`` runs published stpipe steps after (``pre_hooks``:
    before) a step, and ``use={"refpix": "stpipe:jwst.refpix.RefPixStep"}`` replaces one.
    """
    from .core.engine import RunConfig, process_file

    from .config import take_hooks

    params = {step: dict(values) for step, values in (steps or {}).items()}
    hooks = take_hooks(params)
    config = RunConfig(params=params, use=use or {}, overrides=overrides or {},
                       output_dir=Path(output_dir) if output_dir else None, overwrite=overwrite,
                       hooks=hooks)
    return process_file(path, config).products

"""Run configuration from a TOML file and command-line options, merged into a RunConfig.

File layout (every table optional)::

    [steps.jump]               # parameters of one step, as with --set jump.NAME=VALUE
    rejection_threshold = 5.0
    [steps.firstframe]
    skip = false
    [use]                      # implementation per step, as with --use
    ramp_fit = "likely"
    [override]                 # reference files, as with --override (a path or "N/A")
    dark = "/refs/my_dark.fits"
    [output]
    dir = "products"
    overwrite = false
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from .core.engine import RunConfig
from .core.errors import BadInputError


def _pair(option: str, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise BadInputError(f"{option} {text!r}: expected NAME=VALUE")
    return key.strip(), value.strip()


def load(config_file: Path | None = None, *, skip: list[str] = (), sets: list[str] = (),
         overrides: list[str] = (), use: list[str] = (), output_dir: Path | None = None,
         overwrite: bool = False) -> RunConfig:
    """Build a RunConfig: the file first, command-line options on top."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except FileNotFoundError:
            raise BadInputError(f"{config_file}: no such configuration file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"{config_file}: not valid TOML ({exc})") from None
        unknown = set(data) - {"steps", "use", "override", "output"}
        if unknown:
            raise BadInputError(f"{config_file}: unknown table [{sorted(unknown)[0]}] "
                                "(expected steps, use, override, output)")
    params: dict[str, dict[str, Any]] = {}
    for step, values in (data.get("steps") or {}).items():
        if not isinstance(values, dict):
            raise BadInputError(f"{config_file}: [steps.{step}] must be a table of parameters")
        params[step] = dict(values)
    for name in skip:
        params.setdefault(name, {})["skip"] = True
    for text in sets:
        key, value = _pair("--set", text)
        step, dot, param = key.partition(".")
        if not dot or not param:
            raise BadInputError(f"--set {text!r}: expected STEP.PARAM=VALUE")
        params.setdefault(step, {})[param] = value
    chosen = {k: str(v) for k, v in (data.get("use") or {}).items()}
    chosen.update(dict(_pair("--use", t) for t in use))
    refs = {k.lower(): str(v) for k, v in (data.get("override") or {}).items()}
    refs.update({k.lower(): v for k, v in (_pair("--override", t) for t in overrides)})
    out = data.get("output") or {}
    return RunConfig(
        params=params, use=chosen, overrides=refs,
        output_dir=Path(output_dir) if output_dir else (Path(out["dir"]) if "dir" in out else None),
        overwrite=overwrite or bool(out.get("overwrite", False)),
    )

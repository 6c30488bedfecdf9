"""cffi builders for the kernels, run by setup.py (``cffi_modules``) at install time.

Each ``<name>.h`` here declares the functions of ``<name>.c`` once: the C file includes
it, so the compiler checks every definition against it, and cffi builds from the same
text the module ``streamdet._ckernels._<name>`` whose ``lib`` checks every call's
argument count and pointer types (see ``streamdet._ckernels.pointer``). The kernels
need no Python headers and call no Python; cffi releases the GIL around each call.

The DQ bits the kernels test come from ``streamdet/core/dqflags.py`` (the one table) as
``DQ_<NAME>`` macros; it is read without importing it so that the build needs no numpy.
"""

import ast
import os
from functools import partial
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

# -ffp-contract=off: a*b+c stays two roundings, as numpy computes it, so results are
# bit-identical to the numpy formulation the tests compare against
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"]


def dq_macros() -> list[tuple[str, str]]:
    """``DQ_<NAME>`` for every bit of ``dqflags.PIXEL``, as unsigned C constants."""
    tree = ast.parse((HERE.parent / "core" / "dqflags.py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if getattr(target, "id", None) == "PIXEL":
            table = eval(compile(ast.Expression(node.value), "dqflags.py", "eval"), {})
            return [(f"DQ_{name}", f"{value}u") for name, value in table.items()]
    raise RuntimeError("streamdet/core/dqflags.py has no PIXEL table")


def declarations(header: Path) -> str:
    """The header without preprocessor lines (cffi's cdef parses declarations only)."""
    return "\n".join(line for line in header.read_text().splitlines()
                     if not line.lstrip().startswith("#"))


#: kernels that call another's C functions get its source compiled in too (one source,
#: one implementation; its functions are not in the module's ``lib`` unless its header
#: declares them)
CALLS = {"ramp_fit": ("row_medians",)}


def builder(name: str) -> FFI:
    header = HERE / f"{name}.h"
    relative = Path(os.path.relpath(HERE))  # setuptools wants sources relative to setup.py
    ffi = FFI()
    ffi.cdef(declarations(header))
    sources = [str(relative / f"{source}.c") for source in (name, *CALLS.get(name, ()))]
    ffi.set_source(f"streamdet._ckernels._{name}", f'#include "{name}.h"',
                   sources=sources, include_dirs=[str(relative)],
                   define_macros=dq_macros(), extra_compile_args=FLAGS)
    return ffi


#: one builder per header, named like it (``cffi_modules`` entries "_build.py:<name>")
KERNELS = sorted(h.stem for h in HERE.glob("*.h"))
for _name in KERNELS:
    globals()[_name] = partial(builder, _name)

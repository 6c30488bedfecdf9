"""Exceptions that carry a one-line message for the user, and how the command line
reports them.

The CLI maps :class:`BadInputError` to exit code 2 and anything else to exit code 1;
neither prints a traceback unless ``--debug`` is given (see :func:`report`).
"""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from pathlib import Path
from typing import IO

#: exit codes of the command line (``streamdet process``, ``watch``, ``status``...);
#: a run stopped by a signal exits with ``EXIT_SIGNAL_BASE + signal`` (SIGINT: 130)
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_SIGNAL_BASE = 128


class StreamdetError(Exception):
    """Base of streamdet's own errors: ``str(err)`` is a complete one-line message."""


class BadInputError(StreamdetError):
    """The input (a file, a reference, a parameter, a configuration) cannot be processed."""


class ReferenceError_(BadInputError):
    """A reference file is missing, does not match the exposure, or cannot be resolved."""


class PluginError(StreamdetError):
    """A plugin package is broken or two plugins conflict."""


class MissingModuleError(StreamdetError):
    """A Python module streamdet (or a library it calls) needs is not installed: the
    installation is incomplete, which is not the input's fault (exit 1)."""

    def __init__(self, module: str, needed_by: str | None = None):
        self.module = module
        top = module.split(".")[0]
        package = _DISTRIBUTIONS.get(top, top)
        by = f" (needed by {needed_by})" if needed_by else ""
        if module.startswith("streamdet._ckernels."):  # built from C at install time
            super().__init__(f"internal error: streamdet's compiled kernel {module!r} is not "
                             "built; reinstall streamdet with a C compiler available "
                             "(pip install . builds the kernels)")
            return
        super().__init__(f"internal error: the Python module {module!r} is not installed{by}; "
                         f"install it with: pip install {package}")


#: import name -> the distribution to install, where they differ
_DISTRIBUTIONS = {"yaml": "pyyaml", "skimage": "scikit-image", "erfa": "pyerfa",
                  "distributed": "distributed", "cv2": "opencv-python-headless"}

_NO_MODULE = re.compile(r"No module named '([A-Za-z_][\w.]*)'")


def missing_module(exc: BaseException) -> str | None:
    """The module whose absence caused ``exc`` (a ModuleNotFoundError, or a library's own
    error that wraps one in its message, as crds does), else None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        return exc.name
    found = _NO_MODULE.search(str(exc))
    return found.group(1) if found else None


class InputWarning(UserWarning):
    """Something in the input that the run works around (its message is one line)."""


class Interrupted(BaseException):
    """The process was asked to stop by a signal (SIGTERM, SIGHUP): raised in the main
    thread so that every ``finally`` runs and the run leaves nothing behind. Like
    :class:`KeyboardInterrupt`, not an :class:`Exception`: nothing catches it by accident."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL_BASE + self.signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


def shown(text: object) -> str:
    """A name or path as one printable line: control and other unprintable characters
    (a newline, an escape sequence, a line separator) and bytes that are not UTF-8 are
    written as Python escapes, and a backslash as two, so that a name can neither forge a
    line of output nor be mistaken for another."""
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def _printable(line: str) -> str:
    """``line`` with unprintable characters escaped (backslashes kept as they are: the
    names in it are already :func:`shown`)."""
    if line.isprintable():
        return line
    return "".join(ch if ch.isprintable() else shown(ch) for ch in line)


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) made one blank."""
    return " ".join(str(text).split())


def exit_code(exc: BaseException, bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """2 for bad input (:class:`BadInputError` or one of ``bad_input``), else 1."""
    return EXIT_BAD_INPUT if isinstance(exc, (BadInputError, *bad_input)) else EXIT_INTERNAL


def message(exc: BaseException, where: str | Path | None = None,
            bad_input: tuple[type[BaseException], ...] = ()) -> str:
    """The one line the user sees for ``exc`` (without the ``streamdet: error:`` prefix).

    ``where`` (the input being processed) leads the line unless the message already
    names it: a reference's own error then also says which exposure it was for. An
    exception that is not streamdet's own is an internal error, reported with its type."""
    module = None if isinstance(exc, StreamdetError) else missing_module(exc)
    if module is not None:
        exc = MissingModuleError(module)
    text = _printable(one_line(exc))
    prefix = ""
    if where is not None and shown(where) not in text and one_line(where) not in text:
        prefix = f"{shown(where)}: "
    if isinstance(exc, (StreamdetError, *bad_input)):
        return prefix + (text or type(exc).__name__)
    detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{prefix}internal error: {detail} (run with --debug for details)"


def report(exc: BaseException, *, debug: bool = False, where: str | Path | None = None,
           bad_input: tuple[type[BaseException], ...] = (), stream: IO[str] | None = None) -> int:
    """Tell the user about ``exc`` on stderr and return the exit code for it.

    One line, ``streamdet: error: <message>``; with ``debug`` the traceback comes first."""
    stream = stream if stream is not None else sys.stderr
    if debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=stream)
    stream.write(f"streamdet: error: {message(exc, where, bad_input)}\n")
    stream.flush()
    return exit_code(exc, bad_input)

"""Exceptions that carry a one-line message for the user.

The CLI maps :class:`BadInputError` to exit code 2 and anything else to exit code 1;
neither prints a traceback unless ``--debug`` is given.
"""

from __future__ import annotations


class StreamdetError(Exception):
    """Base of streamdet's own errors: ``str(err)`` is a complete one-line message."""


class BadInputError(StreamdetError):
    """The input (a file, a reference, a parameter, a configuration) cannot be processed."""


class ReferenceError_(BadInputError):
    """A reference file is missing, does not match the exposure, or cannot be resolved."""


class PluginError(StreamdetError):
    """A plugin package is broken or two plugins conflict."""

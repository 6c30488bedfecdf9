"""The daemon's log: one line per event, as text or as one JSON object per line."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import threading
from typing import Any, TextIO


def printable(text: str) -> str:
    """``text`` as one encodable line: control characters, line and paragraph separators
    and undecodable bytes (surrogate escapes of a file name) written as escapes, so that
    a file name cannot forge log lines or make a line unwritable."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        elif 0xDC80 <= code < 0xDD00:          # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


class EventLog:
    def __init__(self, fmt: str = "text", stream: TextIO | None = None):
        if fmt not in ("text", "json"):
            raise ValueError(f"log format must be text or json, not {fmt!r}")
        self.fmt = fmt
        self.stream = stream
        self._lock = threading.RLock()  # a signal handler may log mid-write

    def __call__(self, event: str, message: str, *, level: str = "info", **fields: Any) -> None:
        now = _dt.datetime.now(_dt.timezone.utc)
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        if self.fmt == "json":
            obj = {"time": stamp, "level": level, "event": event, "message": message}
            obj.update({k: v for k, v in fields.items() if v is not None})
            line = json.dumps(obj, default=str, separators=(",", ":"))  # escapes all
        else:
            line = f"{stamp} {level.upper():<7} {event:<10} {printable(message)}"
        stream = self.stream or sys.stderr
        with self._lock:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (OSError, ValueError, RuntimeError):  # closed pipe, reentrant write
                pass

    def capture_python_logging(self, level: int | None = None) -> None:
        """Send Python logging (warnings included) through this log, so that library
        messages (distributed, crds, astropy) keep the chosen line format. Loggers that
        libraries gave their own console handlers are rerouted too."""
        import logging

        log = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    msg = record.getMessage()
                except Exception:  # pragma: no cover
                    msg = str(record.msg)
                log("library", f"{record.name}: {msg}", level=record.levelname.lower(),
                    logger=record.name)

        handler = _Handler(level if level is not None else logging.WARNING)
        logging.captureWarnings(True)
        root = logging.getLogger()
        root.handlers[:] = [handler]
        if root.level > handler.level or root.level == logging.NOTSET:
            root.setLevel(handler.level)
        for logger in list(logging.root.manager.loggerDict.values()):
            if not isinstance(logger, logging.Logger):
                continue
            console = [h for h in logger.handlers if isinstance(h, logging.StreamHandler)
                       and not isinstance(h, logging.FileHandler)]
            if console:
                for h in console:
                    logger.removeHandler(h)
                logger.addHandler(handler)

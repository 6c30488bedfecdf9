"""What a worker runs for one file: local pool processes and Dask workers alike.

:func:`run_job` never raises for a processing error: it returns a
:class:`~.jobs.JobFailed` that says whether the error is *permanent*
(:class:`~streamdet.core.errors.BadInputError`: a corrupt file, a wrong instrument, a
missing reference -- retrying cannot help) or *transient* (anything else). Exceptions that
reach the caller (a worker process that died, a lost Dask worker) are transient by
definition.

Products are written into the job's private staging directory (inside OUTBOX, so the
daemon's final rename is on one filesystem); the daemon renames them into place.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import traceback
import warnings

from .jobs import Job, JobDone, JobFailed, JobResult

#: the environment a job may carry to its worker (the daemon's CRDS settings)
ENV_PREFIXES = ("CRDS_",)


def apply_env(env: dict[str, str] | None) -> None:
    """Set the daemon's CRDS_* variables in this worker (before crds is imported, when
    this is the worker's first job). crds's own console messages are silenced unless the
    daemon's environment asks for them: the daemon reports every failure itself."""
    for key, value in (env or {}).items():
        if key.startswith(ENV_PREFIXES) and os.environ.get(key) != value:
            os.environ[key] = value
    os.environ.setdefault("CRDS_VERBOSITY", "-3")


def daemon_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)}


def run_job(job: Job) -> JobResult:
    """Process the inbox entry ``job.name`` into ``job.staging`` with ``job.config``.

    The entry is opened once, as an entry of INBOX itself (:func:`~.watcher.open_entry`:
    a symlink swapped in after the daemon's look is never followed out of INBOX); the
    opened file must be the very version the daemon checked (``job.expect``: inode,
    size, mtime -- not the device number, which differs between hosts sharing a network
    filesystem), and the engine reads only through that descriptor."""
    apply_env(job.env)
    import dataclasses
    from pathlib import Path

    from streamdet.core.engine import RunConfig, process_file
    from streamdet.core.errors import BadInputError
    from streamdet.core.plugins import PluginWarning

    from . import watcher

    worker = f"{socket.gethostname()}:{os.getpid()}"
    started = time.perf_counter()
    if _WRONG_CODE:
        return JobFailed(kind="transient", error=_WRONG_CODE, worker=worker, lost=True)

    def refused(kind: str, error: str) -> JobFailed:
        return JobFailed(kind=kind, error=error, worker=worker,
                         seconds=time.perf_counter() - started)

    staging = Path(job.staging)
    fd = None
    try:
        if job.inbox is not None:
            try:
                fd, st = watcher.open_entry(Path(job.inbox), job.name)
            except watcher.Refused as exc:
                return refused(exc.kind, exc.reason)
            except (FileNotFoundError, watcher.NotRegular):
                return refused("vanished", "the input disappeared before the worker opened it")
            version = (st.st_ino, st.st_size, st.st_mtime_ns)
            if job.expect and version != job.expect:
                return refused("changed", "the input was replaced or changed after the daemon "
                               "checked it")
        staging.mkdir(parents=True, exist_ok=True)
        config = job.config or RunConfig()
        config = dataclasses.replace(config, output_dir=staging, overwrite=True,
                                     scratch_dir=staging)
        with warnings.catch_warnings(record=True) as caught:
            # a misbehaving observer plugin is reported with the file, in the daemon's log
            warnings.simplefilter("always", PluginWarning)
            result = process_file(job.path, config, source_fd=fd)
        plugin_warnings = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
        for w in caught:
            if not issubclass(w.category, PluginWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return JobDone(products={k: str(v) for k, v in result.products.items()},
                       seconds=result.seconds, timings=result.timings, worker=worker,
                       warnings=tuple(plugin_warnings))
    except BadInputError as exc:
        return JobFailed(kind="permanent", error=str(exc), worker=worker,
                         seconds=time.perf_counter() - started)
    except Exception as exc:
        return JobFailed(kind="transient", error=f"{type(exc).__name__}: {exc}", worker=worker,
                         traceback=traceback.format_exc(limit=20),
                         seconds=time.perf_counter() - started)
    finally:
        if fd is not None:
            os.close(fd)


# -- local pool workers ---------------------------------------------------------------------

def redirect_output(output: str | None) -> None:
    """Append this process's stdout/stderr to ``output`` (best effort)."""
    if not output:
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        pass


def probe() -> dict:
    """What a worker runs: its pid and the streamdet package it imports."""
    import streamdet

    return {"pid": os.getpid(), "package": os.path.dirname(os.path.abspath(streamdet.__file__))}


#: set in a local worker whose streamdet is not the daemon's: it then runs no file
_WRONG_CODE: str | None = None


def init_local_worker(daemon_pid: int, env: dict[str, str], output: str | None = None,
                      package: str | None = None) -> None:
    """Initializer of a local pool process: the daemon's CRDS env before any crds import,
    SIGINT ignored (the daemon decides when work stops), stdout/stderr appended to
    ``output`` (so library chatter never mixes into the daemon's log lines), warm imports,
    and a guard thread that ends the process when the daemon is gone (so a SIGKILLed
    daemon leaves no orphans behind)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    redirect_output(output)
    apply_env(env)
    global _WRONG_CODE
    mine = probe()["package"]
    if package and mine != package:
        _WRONG_CODE = f"this worker imports streamdet from {mine}, the daemon runs {package}"
    parent = os.getppid()

    def guard() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent or not _alive(daemon_pid):
                os._exit(0)

    threading.Thread(target=guard, name="streamdet-orphan-guard", daemon=True).start()
    warm_up()


def warm_up() -> None:
    """Pay the one-time costs before the first file rather than during it: the engine's
    imports, plugin discovery, and crds's first lookup (which loads the JWST datamodel
    schemas, several seconds). Best effort: a problem here shows up in run_job's result."""
    os.environ.setdefault("CRDS_VERBOSITY", "-3")
    try:
        import streamdet.core.engine  # noqa: F401
        from streamdet.core.plugins import get_registry

        get_registry()
        import crds  # noqa: F401  (reads the CRDS env once, now)
        from crds.jwst import locate

        locate.cached_dm_find_fits_keyword("META.INSTRUMENT.DETECTOR")
        context = os.environ.get("CRDS_CONTEXT")
        if context:
            crds.get_cached_mapping(context)
    except Exception:  # pragma: no cover
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

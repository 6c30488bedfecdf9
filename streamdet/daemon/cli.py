"""``streamdet watch`` and ``streamdet status``.

Only typer and core/errors.py (the exit codes; standard library only) are imported at
module level: ``streamdet --help`` must stay fast. watchdog, sqlite3, multiprocessing and
distributed are imported inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..core.errors import EXIT_BAD_INPUT, EXIT_INTERNAL


def watch(
    inbox: Path = typer.Argument(..., help="directory where Level 1B files arrive"),
    output: Path = typer.Option(..., "--output", "-o", help="OUTBOX: where rate products go"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="files processed at once (default: CPU count; "
                                               "with --dask-scheduler: the cluster's threads)"),
    dask_scheduler: Optional[str] = typer.Option(None, "--dask-scheduler",
                                                 help="run on an existing Dask cluster, e.g. "
                                                      "tcp://host:8786"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML run configuration"),
    once: bool = typer.Option(False, "--once", help="process what is in INBOX, then exit"),
    poll: bool = typer.Option(False, "--poll", help="poll the directory (NFS) instead of inotify"),
    settle: float = typer.Option(2.0, "--settle", min=0.0,
                                 help="seconds a file must stay unchanged to count as complete"),
    pattern: str = typer.Option("*_uncal.fits", "--pattern", help="glob of the files to take"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir",
                                             help="journal and quarantine (default OUTBOX/.streamdet)"),
    retries: int = typer.Option(2, "--retries", min=0,
                                help="retries of a file after transient (non-input) errors"),
    archive: Optional[Path] = typer.Option(None, "--archive",
                                           help="move done inputs here (else they stay)"),
    on_change: str = typer.Option("reprocess", "--on-change",
                                  help="a done file whose content changes: reprocess|ignore"),
    log_format: str = typer.Option("text", "--log-format", help="text|json (one object a line)"),
    grace: float = typer.Option(30.0, "--grace", min=0.0,
                                help="on SIGTERM/SIGINT, seconds to let running files finish "
                                     "(the rest are redone at restart)"),
    rebuild_journal: bool = typer.Option(False, "--rebuild-journal",
                                         help="move the journal aside (kept) and rebuild it "
                                              "from OUTBOX and the quarantine"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    """Watch INBOX and turn each complete *_uncal.fits into rate products in OUTBOX.

    Survives restarts (a SQLite journal in the state directory), quarantines bad files,
    and scales out to a Dask cluster. SIGTERM/SIGINT: finish running files and exit 0;
    a second signal exits at once."""
    import signal

    early: list[int] = []   # a stop asked for while still starting up is honoured too

    def _early_stop(signum, frame):
        if early:
            raise SystemExit(128 + signum)
        early.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _early_stop)

    from ..core.errors import BadInputError
    from .daemon import Daemon, WatchError, WatchOptions
    from .journal import JournalBroken

    if on_change not in ("reprocess", "ignore"):
        _error(f"--on-change must be reprocess or ignore, not {on_change!r}", EXIT_BAD_INPUT)
    if log_format not in ("text", "json"):
        _error(f"--log-format must be text or json, not {log_format!r}", EXIT_BAD_INPUT)
    try:
        if config is not None:   # checked here, against the installed steps: bad -> exit 2
            from .. import config as configmod

            run = configmod.load(config)
        else:
            from ..core.engine import RunConfig

            run = RunConfig()
        opts = WatchOptions(inbox=inbox, outbox=output, state_dir=state_dir, workers=workers,
                            dask_scheduler=dask_scheduler, config=run, once=once, poll=poll,
                            settle=settle, pattern=pattern, retries=retries, archive=archive,
                            on_change=on_change, log_format=log_format, grace=grace,
                            rebuild_journal=rebuild_journal)
        daemon = Daemon(opts)
        daemon.early_stop = early
        code = daemon.run()
    except (WatchError, BadInputError, JournalBroken) as exc:
        if debug:
            raise
        _error(str(exc), EXIT_BAD_INPUT)
    except Exception as exc:
        if debug:
            raise
        from .executor import ExecutorError

        if isinstance(exc, ExecutorError):
            _error(str(exc), EXIT_INTERNAL)
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
               EXIT_INTERNAL)
    raise typer.Exit(code)


def status(
    outbox: Path = typer.Argument(..., help="the OUTBOX given to streamdet watch"),
    state_dir: Optional[Path] = typer.Option(None, "--state-dir",
                                             help="journal directory (default OUTBOX/.streamdet)"),
    errors: int = typer.Option(5, "--errors", min=0, help="how many recent errors to show"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Counts per state, the last errors, throughput and files waiting."""
    import json

    from .journal import JournalError
    from .status import collect, render

    directory = state_dir or (outbox / ".streamdet")
    try:
        info = collect(directory, errors)
    except JournalError as exc:
        _error(str(exc), EXIT_BAD_INPUT)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else render(info))


def _error(message: str, code: int) -> None:
    typer.echo(f"streamdet: error: {message}", err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``watch`` and ``status`` to the streamdet command line."""
    app.command("watch")(watch)
    app.command("status")(status)

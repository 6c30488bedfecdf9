"""The ``streamdet`` command line (typer).

Exit codes: 0 success, 2 bad input (file, reference, parameter, configuration),
1 internal error. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from .cli_values import convert_plainly


class _Commands(TyperGroup):
    """streamdet's commands: the group and the command invoked convert their plain
    option values without pydantic (see :mod:`streamdet.cli_values`)."""

    def parse_args(self, ctx, args):
        convert_plainly(self, ctx)
        return super().parse_args(ctx, args)

    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            convert_plainly(command, ctx)
        return name, command, rest


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False,
                  help="Streaming JWST MIRI Detector1 processing: uncal ramps to rate images.")

#: set by the one-shot commands (process, demo): once they return, everything they made
#: is on disk and closed, so the process may end without the interpreter's teardown
_one_shot = False


def _timings_table(timings: dict[str, float]):
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.3f}")
    table.add_row("total", f"{sum(timings.values()):.3f}", style="bold")
    return table


@app.command()
def process(
    files: List[Path] = typer.Argument(..., help="Level 1B *_uncal.fits files"),
    output_dir: Optional[Path] = typer.Option(None, "-o", "--output-dir", help="where products go (default: beside each input)"),
    config: Optional[Path] = typer.Option(None, "--config", help="configuration file: TOML, or a jwst ASDF parameter file"),
    skip: List[str] = typer.Option([], "--skip", help="skip STEP (repeatable)"),
    set_: List[str] = typer.Option([], "--set", help="STEP.PARAM=VALUE (repeatable; jwst's --steps.STEP.PARAM=VALUE works too)"),
    no_crds_pars: bool = typer.Option(False, "--no-crds-pars", help="do not apply the CRDS step-parameter references (pars-*)"),
    save_parameters: Optional[Path] = typer.Option(None, "--save-parameters", help="write the run's parameters as a jwst ASDF parameter file (FILE.asdf) and go on"),
    override: List[str] = typer.Option([], "--override", help="REFTYPE=PATH or REFTYPE=N/A (repeatable)"),
    use: List[str] = typer.Option([], "--use", help="STEP=IMPL: choose an implementation (repeatable); STEP=stpipe:pkg.Class runs a published stpipe step instead"),
    pre_hook: List[str] = typer.Option([], "--pre-hook", help="STEP=pkg.Class: run an stpipe step before STEP, as jwst's pre_hooks (repeatable). Like --post-hook"),
    post_hook: List[str] = typer.Option([], "--post-hook", help="STEP=pkg.Class: run an stpipe step after STEP, as jwst's post_hooks (repeatable; e.g. jump=snowblind.SnowblindStep; after ramp_fit it gets the rate models). Parameters: --set ALIAS.PARAM=VALUE, ALIAS its class_alias. It gets one integration at a time (memory: one integration); --set ALIAS.granularity=exposure gives it the whole exposure at once, which then sits in memory whole, several times over (the ramp, the model, the step's copies)"),
    save_ramp: bool = typer.Option(False, "--save-ramp", help="also write the ramp as ramp_fit receives it, as _ramp.fits (jwst's save_calibrated_ramp)"),
    save_after: List[str] = typer.Option([], "--save-after", help="STEP: also write the ramp as it leaves STEP, as _STEP.fits (repeatable)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="threads over row bands (default $STREAMDET_THREADS, else all usable CPUs)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing products"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="print only errors"),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="print references, parameters (and where each came from) and skip reasons"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
):
    """Turn Level 1B exposures into _rate.fits and _rateints.fits."""
    global _one_shot
    _one_shot = True

    from rich.console import Console

    from . import config as configmod
    from .core import errors
    from .core.errors import shown
    from .core.plugins import get_registry

    if not (debug or verbose):  # crds logs its own copy of a lookup failure we report
        os.environ.setdefault("CRDS_VERBOSITY", "-3")
    console = Console(stderr=True, quiet=quiet)
    with _signals_as_exceptions():
        try:
            registry = get_registry()
            if not quiet:  # first: a broken plugin may be why an option below is refused
                for message in registry.broken:
                    typer.echo(f"streamdet: warning: {message}", err=True)
            run = configmod.load(config, skip=skip, sets=set_, overrides=override, use=use,
                                 output_dir=output_dir, overwrite=overwrite, registry=registry,
                                 crds_pars=not no_crds_pars, pre_hooks=pre_hook,
                                 post_hooks=post_hook)
            _log_to_stderr(quiet, verbose or debug)
            run.save_ramp = save_ramp or run.save_ramp
            run.save_after = tuple(save_after)
            if threads is not None:
                run.threads = threads
            if save_parameters is not None:
                configmod.save_parameters(save_parameters, run, registry)
                if not quiet:
                    typer.echo(f"parameters: {shown(save_parameters)}")
            if run.output_dir:  # one directory for every file: refused before any work
                check_output_dir(Path(run.output_dir))
        except errors.Interrupted as exc:
            raise typer.Exit(_interrupted(exc))
        except Exception as exc:
            raise typer.Exit(errors.report(exc, debug=debug, where=config))
        failures = 0
        for n, path in enumerate(files):
            if n == 1:
                gc.enable()
            try:
                out_dir = Path(run.output_dir) if run.output_dir else Path(path).parent
                if not run.output_dir and out_dir.is_dir():  # beside the input
                    check_output_dir(out_dir, source=path, create=False)
                check_product_names(path, out_dir, run.save_ramp, run.save_after)
                with _plugin_warnings_as_lines(quiet):
                    result = _process_one(path, run, console, quiet)
            except KeyboardInterrupt:
                import signal

                raise typer.Exit(_interrupted(errors.Interrupted(signal.SIGINT)))
            except errors.Interrupted as exc:
                raise typer.Exit(_interrupted(exc))
            except Exception as exc:  # one bad file does not stop the others
                # the engine has removed whatever it wrote for this file; nothing else is
                # touched here
                failures = max(failures, errors.report(exc, debug=debug, where=path))
                continue
            if not quiet:
                for kind, product in result.products.items():
                    typer.echo(f"{kind}: {shown(product)}")
                if verbose:
                    for step in result.chain:
                        state = "ran" if not step.skip else f"skipped ({step.skip_reason})"
                        console.print(f"  {step.name:<13} {step.implementation:<10} {state}",
                                      soft_wrap=True, highlight=False, markup=False)
                    for reftype, res in result.references.items():
                        where = shown(res.path) if res.path else "N/A"
                        console.print(f"  {reftype:<11} {where} [{res.source}]",
                                      soft_wrap=True, highlight=False, markup=False)
                    if result.parameters is not None:
                        for pars in result.parameters.pars:
                            console.print(f"  {pars.reftype:<11} {shown(pars.path)} [crds]",
                                          soft_wrap=True, highlight=False, markup=False)
                        for line in result.parameters.lines():
                            console.print(f"  {line}", soft_wrap=True, highlight=False,
                                          markup=False)
                typer.echo(f"{shown(path.name)}: {result.seconds:.2f} s")
                console.print(_timings_table(result.timings))
    if failures:
        raise typer.Exit(failures)


def _log_to_stderr(quiet: bool, verbose: bool) -> None:
    """The ``streamdet.*`` loggers (an stpipe step's records arrive as
    ``streamdet.ALIAS``) as ``streamdet: NAME: message`` lines on stderr: warnings and
    errors, INFO too with -v, nothing with -q."""
    import logging

    logger = logging.getLogger("streamdet")
    # this invocation's handler only (a process may run several commands, as tests do);
    # records still propagate, so that a host's own logging (pytest's capture) sees
    # them too: having a handler here keeps Python's last-resort handler out
    for old in [h for h in logger.handlers if getattr(h, "_streamdet_cli", False)]:
        logger.removeHandler(old)
    if quiet:
        handler = logging.NullHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("streamdet: %(short)s: %(message)s"))
        handler.addFilter(_ShortName())
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
    handler._streamdet_cli = True
    logger.addHandler(handler)


class _ShortName:
    def filter(self, record) -> bool:
        record.short = record.name.split(".", 1)[1] if "." in record.name else record.name
        return True


def check_output_dir(directory: Path, source: Path | None = None, create: bool = True) -> None:
    """Refuse, before any work, an output directory that products cannot be written to.
    A missing one is created now (as the writer would later), then probed."""
    from .core.errors import BadInputError, shown
    from .core.products import probe_writable

    lead = f"{shown(source)}: " if source is not None else ""
    if directory.exists() and not directory.is_dir():
        raise BadInputError(f"{lead}output directory {shown(directory)} is not a directory")
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"{lead}output directory {shown(directory)} cannot be created "
                            f"({exc.strerror or exc})") from None
    try:
        probe_writable(directory)
    except OSError as exc:
        raise BadInputError(f"{lead}output directory {shown(directory)} is not writable "
                            f"({exc.strerror or exc})") from None


def check_product_names(path: Path, out_dir: Path, save_ramp: bool = False,
                        save_after: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an input whose product names (and the writer's temporary
    names for them) would be too long for the output directory's file system."""
    from .core.errors import BadInputError, shown
    from .core.products import TEMP_NAME_EXTRA, name_max, output_paths

    longest = max((p.name for p in output_paths(path, out_dir, save_ramp, save_after).values()),
                  key=lambda n: len(os.fsencode(n)))
    limit = name_max(out_dir)
    need = len(os.fsencode(longest)) + TEMP_NAME_EXTRA
    if need > limit:
        raise BadInputError(
            f"{shown(path)}: name too long: product {shown(longest)} and its temporary name "
            f"need {need} bytes, the file system allows {limit} (rename the input)")


def _interrupted(exc) -> int:
    typer.echo(f"streamdet: {exc}; stopped, nothing of the interrupted file is left", err=True)
    return exc.exit_code


@contextlib.contextmanager
def _signals_as_exceptions():
    """SIGTERM and SIGHUP raise :class:`~streamdet.core.errors.Interrupted` in the main
    thread for the duration, so that the run unwinds through its ``finally`` clauses
    (temporary products and scratch removed) instead of dying where it stands. A second
    signal during the unwinding is ignored; the handlers in place before are restored."""
    import signal
    import threading

    from .core.errors import Interrupted

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for sig in caught:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    caught = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    previous = {s: signal.signal(s, handler) for s in caught}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _plugin_warnings_as_lines(quiet: bool):
    """Show what a plugin did wrong during a run (a
    :class:`~streamdet.core.plugins.PluginWarning`, e.g. an observer that raised) as one
    ``streamdet: warning:`` line, like a broken plugin, and not at all with ``--quiet``.
    Other warnings are shown as Python shows them."""
    import warnings

    from .core.errors import InputWarning
    from .core.plugins import PluginWarning

    with warnings.catch_warnings():
        # the engine reports each plugin once per run already: show every report
        warnings.simplefilter("ignore" if quiet else "always", PluginWarning)
        warnings.simplefilter("ignore" if quiet else "always", InputWarning)
        show_python_warning = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, (PluginWarning, InputWarning)):
                typer.echo(f"streamdet: warning: {message}", err=True)
            else:
                show_python_warning(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _process_one(path: Path, run, console, quiet: bool):
    from .core.engine import process_file
    from .core.errors import shown

    if quiet or not console.is_terminal:
        return process_file(path, run)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(f"{shown(path.name)}: {stage}", total=total)
            progress.update(tasks[stage], completed=done)

        return process_file(path, run, on_progress=on_progress)


@app.command()
def steps(
    use: List[str] = typer.Option([], "--use", help="STEP=IMPL, to show a choice"),
    pre_hook: List[str] = typer.Option([], "--pre-hook", help="STEP=pkg.Class, to show a hooked stpipe step"),
    post_hook: List[str] = typer.Option([], "--post-hook", help="STEP=pkg.Class, to show a hooked stpipe step"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML configuration file (its hooks and choices)"),
    debug: bool = typer.Option(False, "--debug"),
):
    """Show the chain: each step, its implementations, default skip and parameters."""
    from rich.console import Console
    from rich.table import Table

    from . import config as configmod
    from .core import errors
    from .core.plugins import get_registry

    try:
        run = configmod.load(config, use=use, registry=get_registry(), whole_chain=False,
                             pre_hooks=pre_hook, post_hooks=post_hook)
        registry = get_registry().for_run(run)
        chosen = run.use
        rows = []
        for name in registry.order:
            try:
                active = registry.implementation(name, chosen)
            except Exception as exc:  # undecided (two implementations): show them all
                active = None
                typer.echo(f"streamdet: warning: {exc}", err=True)
            for impl in registry.implementations[name]:
                params = ", ".join(f"{k}={p.default!r}" for k, p in impl.params_spec.items())
                rows.append((name, impl.implementation, f"{impl.package} {impl.package_version}",
                             "yes" if impl is active else "", str(impl.default_skip),
                             ", ".join(impl.reftypes) or "-", params or "-"))
    except Exception as exc:
        raise typer.Exit(errors.report(exc, debug=debug))
    columns = ("step", "implementation", "package", "active", "skip", "reftypes", "parameters")
    console = Console()
    if console.is_terminal:
        table = Table(show_lines=False)
        for col in columns:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # piped: one line per implementation, never wrapped or cut
        widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns) - 1)]
        for row in [columns, *rows]:
            typer.echo("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) + "  " + row[-1])
    for message in registry.broken:
        typer.echo(f"streamdet: warning: {message}", err=True)


@app.command()
def plugins():
    """List the installed plugin packages and the hooks they implement."""
    from .core.plugins import get_registry

    registry = get_registry()
    for name, (package, version, hooks) in registry.plugins.items():
        typer.echo(f"{package} {version}  {name.split(':', 1)[1]}: {', '.join(hooks)}")
    for message in registry.broken:
        typer.echo(f"broken: {message}")


@app.command()
def refs(
    file: Path = typer.Argument(..., help="a Level 1B file"),
    config: Optional[Path] = typer.Option(None, "--config"),
    override: List[str] = typer.Option([], "--override", help="REFTYPE=PATH or REFTYPE=N/A"),
    skip: List[str] = typer.Option([], "--skip"),
    set_: List[str] = typer.Option([], "--set", help="STEP.PARAM=VALUE (repeatable)"),
    use: List[str] = typer.Option([], "--use"),
    no_crds_pars: bool = typer.Option(False, "--no-crds-pars", help="leave the CRDS step-parameter references out"),
    pre_hook: List[str] = typer.Option([], "--pre-hook", help="STEP=pkg.Class (an stpipe step's references too)"),
    post_hook: List[str] = typer.Option([], "--post-hook", help="STEP=pkg.Class (an stpipe step's references too)"),
    debug: bool = typer.Option(False, "--debug"),
):
    """Print the reference resolved for each step and where it came from, and the
    parameters set by CRDS parameter references, the configuration or the command line."""
    from . import config as configmod
    from .core import errors
    from .core import references as refmod
    from .core.engine import build_chain
    from .core.exposure import Exposure
    from .core.parameters import effective as effective_parameters
    from .core.plugins import get_registry

    if not debug:  # crds logs its own copy of a lookup failure we report
        os.environ.setdefault("CRDS_VERBOSITY", "-3")
    lines: list[str] = []
    try:
        run = configmod.load(config, skip=skip, sets=set_, overrides=override, use=use,
                             crds_pars=not no_crds_pars, pre_hooks=pre_hook,
                             post_hooks=post_hook)
        registry = get_registry()
    except Exception as exc:
        raise typer.Exit(errors.report(exc, debug=debug, where=config))
    try:
        with Exposure(file) as exposure:
            parameters = effective_parameters(run, exposure.meta, registry)
            chain = build_chain(registry, run, parameters.steps)
            for step in chain:
                if step.skip:
                    lines.append(f"{step.name:<13} (skipped)")
                    continue
                if not step.reftypes and not step.optional_reftypes:
                    lines.append(f"{step.name:<13} (no references)")
                    continue
                resolved = refmod.resolve(exposure.meta, list(step.reftypes), run.overrides)
                resolved.update(refmod.resolve_optional(
                    exposure.meta, list(step.optional_reftypes), run.overrides))
                for reftype, res in resolved.items():
                    where = {"override": "override", "none": "optional, none found"}.get(
                        res.source, f"crds {res.context}")
                    lines.append(f"{step.name:<13} {reftype:<11} {res.path or 'N/A'}  [{where}]")
            for pars in parameters.pars:
                lines.append(f"{pars.step or 'pipeline':<13} {pars.reftype:<11} {pars.path}  "
                             f"[crds {pars.context}]")
            lines += [f"parameter     {line}" for line in parameters.lines()]
    except Exception as exc:
        raise typer.Exit(errors.report(exc, debug=debug, where=file))
    for line in lines:  # all or nothing: no half listing before an error
        typer.echo(line)


@app.command()
def simulate(
    outdir: Path = typer.Argument(..., help="directory to write the exposure, references and CRDS cache"),
    subarray: str = typer.Option("SUB64", "--subarray", help="FULL, BRIGHTSKY, SUB256, SUB128, SUB64, ..."),
    ngroups: int = typer.Option(10, "--ngroups"),
    nints: int = typer.Option(2, "--nints"),
    seed: int = typer.Option(0, "--seed"),
    readpatt: str = typer.Option("FASTR1", "--readpatt", help="FASTR1 or SLOWR1"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    debug: bool = typer.Option(False, "--debug"),
):
    """Simulate a MIRI exposure with matching references and a local CRDS cache."""
    from .core import errors
    from .simulate import SimulationError, simulate as run_simulation

    try:
        result = run_simulation(outdir, subarray=subarray, ngroups=ngroups, nints=nints,
                                seed=seed, readpatt=readpatt, overwrite=overwrite)
    except Exception as exc:  # SimulationError: bad arguments (exit 2)
        raise typer.Exit(errors.report(exc, debug=debug, where=outdir,
                                       bad_input=(SimulationError,)))
    typer.echo(f"uncal: {result.uncal}")
    typer.echo(f"truth: {result.truth_rate}")
    typer.echo(result.shell_exports())


@app.command()
def demo(
    outdir: Path = typer.Argument(Path("streamdet-demo"), help="working directory for the demo"),
    debug: bool = typer.Option(False, "--debug"),
):
    """Simulate a small exposure, process it, and say where the products are."""
    global _one_shot
    _one_shot = True
    from .core import errors
    from .core.engine import RunConfig, process_file
    from .core.products import product_path
    from .quicklook import write_quicklook
    from .simulate import SimulationError, simulate as run_simulation

    if not debug:
        os.environ.setdefault("CRDS_VERBOSITY", "-3")
    try:
        if outdir.exists() and not outdir.is_dir():
            raise errors.BadInputError(f"{outdir}: exists and is not a directory")
        sim = run_simulation(outdir / "input", seed=1, overwrite=True)
        os.environ.update(sim.env)
        result = process_file(sim.uncal, RunConfig(output_dir=outdir / "products", overwrite=True))
        png = product_path(outdir / "products", sim.uncal, "quicklook").with_suffix(".png")
        if not png.exists():  # an installed quick-look plugin may already have drawn a richer one
            write_quicklook(sim.uncal, result.products["rate"], png)
    except Exception as exc:
        raise typer.Exit(errors.report(exc, debug=debug, where=outdir,
                                       bad_input=(SimulationError,)))
    typer.echo(f"input:     {sim.uncal}")
    for kind, path in result.products.items():
        typer.echo(f"{kind + ':':<10} {path}")
    typer.echo(f"quicklook: {png}")
    typer.echo(f"processed in {result.seconds:.2f} s")


# the watch-folder daemon's commands (streamdet/daemon/cli.py); an import error here is a
# broken installation and must show, not hide the commands
from .daemon.cli import register as _register_daemon  # noqa: E402

_register_daemon(app)


def _leave(code: int):
    """End a one-shot command: flush, run the atexit handlers (plugins may rely on
    them), and exit without tearing down every imported module, which takes ~0.15 s
    after astropy and crds have been imported (a tenth of processing a full frame)."""
    if not _one_shot:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def _jwst_spelling(argv: list[str]) -> list[str]:
    """``--steps.STEP.PARAM=VALUE`` (jwst's spelling) as ``--set STEP.PARAM=VALUE``."""
    if not any(a.startswith("--steps.") for a in argv):
        return argv
    from .config import jwst_spelling
    from .core.errors import BadInputError, report

    try:
        return jwst_spelling(argv)
    except BadInputError as exc:
        sys.exit(report(exc))


def main() -> None:
    import signal

    # streamdet runs threads of its own; OpenBLAS's (loaded with numpy, one per CPU) only
    # spin beside them after the odd small BLAS call a library makes: 2-4 % of a full
    # frame's CPU. Before numpy is imported, and only when the user has not chosen.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    argv = _jwst_spelling(sys.argv[1:])
    if argv[:1] == ["process"]:
        # Python's cyclic collector would sweep the freshly imported modules several
        # times over while the run starts (~0.09 s on a small file) and find nothing to
        # free; a batch turns it back on from its second file (the engine pauses it
        # inside each file). Here, not in the command: this process ends with the
        # command, while the command called from Python (CliRunner, a user's script)
        # must leave the caller's collector as it found it.
        gc.disable()

    from .core.errors import EXIT_OK, Interrupted

    try:
        # without standalone mode click returns a command's exit code instead of exiting
        code = app(args=argv, standalone_mode=False)
        _leave(code if isinstance(code, int) else EXIT_OK)
    except typer.Exit as exc:
        _leave(exc.exit_code)
    except typer.Abort:
        typer.echo("streamdet: aborted", err=True)
        sys.exit(Interrupted(signal.SIGINT).exit_code)
    except Interrupted as exc:  # a signal between two files' guarded sections
        _leave(_interrupted(exc))
    except Exception as exc:
        # click's usage errors (typer vendors click, so they are matched by their shape)
        if type(exc).__name__ == "NoArgsIsHelpError":
            typer.echo(exc.ctx.get_help())
            sys.exit(EXIT_OK)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            typer.echo(f"streamdet: error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

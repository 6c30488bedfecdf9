"""Where files run: a local process pool, or an existing Dask ``distributed`` cluster.

Both executors have the same small interface, used only from the daemon's main thread:

* ``capacity()`` -- how many files may be in flight (backpressure: never more files in
  flight than workers);
* ``submit(job)`` -- start one :class:`~.jobs.Job`; when it ends, ``(job.id, handle)``
  appears on :attr:`completions` (a thread-safe queue), and ``outcome(job_id, handle)``
  gives the worker's :class:`~.jobs.JobDone` or :class:`~.jobs.JobFailed` -- or, if the
  worker itself was lost, a transient ``JobFailed`` with ``lost`` set;
* ``shutdown(abandon)`` -- stop; with ``abandon`` cancel what is still running.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from typing import Any

from .jobs import Job, JobFailed, JobResult
from .worker import daemon_env, init_local_worker, probe, run_job


class ExecutorError(RuntimeError):
    pass


def _lost(exc: BaseException) -> JobFailed:
    return JobFailed(kind="transient", lost=True,
                     error=f"worker lost: {type(exc).__name__}: {exc}".rstrip(": "))


def _pin_worker_imports() -> str:
    """Make the local workers import the streamdet the daemon runs, whatever the working
    directory: multiprocessing starts its forkserver (and spawned children) with
    ``python -c``, which puts the working directory first on ``sys.path`` -- a source
    tree there (a clone) would be imported instead. ``PYTHONSAFEPATH`` (Python >= 3.11)
    keeps it off; a streamdet that is not in site-packages (an editable install, a tree
    on PYTHONPATH) has its directory put first. Returns the daemon's ``streamdet`` path,
    which every worker checks against its own."""
    import site

    import streamdet

    package = os.path.dirname(os.path.abspath(streamdet.__file__))
    root = os.path.dirname(package)
    os.environ["PYTHONSAFEPATH"] = "1"
    system = {os.path.abspath(p) for p in site.getsitepackages() + [site.getusersitepackages()]}
    if root not in system:
        rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *rest])
    return package


def _start_resource_tracker(output: str) -> None:
    """Start multiprocessing's resource tracker with its stderr on ``output``: after a
    SIGKILL it warns about leaked semaphores, and that must not land in the daemon's log
    (which may be one JSON object per line)."""
    try:
        from multiprocessing import resource_tracker

        fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        saved = os.dup(2)
        try:
            sys.stderr.flush()
            os.dup2(fd, 2)
            resource_tracker.ensure_running()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(fd)
    except Exception:  # pragma: no cover - only cosmetics are at stake
        pass


class LocalExecutor:
    """``concurrent.futures.ProcessPoolExecutor`` on a forkserver (spawn where there is
    none) context: workers start from a clean interpreter that inherits the daemon's
    environment, set the CRDS env before importing crds, and warm up once."""

    name = "local"

    def __init__(self, workers: int, output: str | None = None):
        import multiprocessing as mp

        self.workers = max(1, int(workers))
        self.output = output
        self.package = _pin_worker_imports()     # before any helper process starts
        self.completions: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        methods = mp.get_all_start_methods()
        if output:
            _start_resource_tracker(output)
        if "forkserver" in methods and sys.platform != "darwin":
            self.ctx = mp.get_context("forkserver")
            if output:
                os.environ["STREAMDET_WATCH_WORKER_OUTPUT"] = output
            self.ctx.set_forkserver_preload(["streamdet.daemon.preload"])
        else:
            self.ctx = mp.get_context("spawn")
        self.pool = None
        self.futures: dict[int, Any] = {}

    def describe(self) -> str:
        return f"local process pool, {self.workers} worker{'s' if self.workers > 1 else ''} " \
               f"({self.ctx.get_start_method()})"

    def _ensure_pool(self):
        if self.pool is None:
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self.ctx,
                                            initializer=init_local_worker,
                                            initargs=(os.getpid(), daemon_env(), self.output,
                                                      self.package))
        return self.pool

    def start(self) -> None:
        """Start the workers now (their imports overlap the inbox scan) and make sure they
        can: a pool that cannot start a worker is an :class:`ExecutorError`."""
        pool = self._ensure_pool()
        for _ in range(self.workers - 1):
            pool.submit(os.getpid)
        problem = self._probe(pool)
        if problem:
            raise ExecutorError(f"the worker pool is broken: {problem}")

    def check(self) -> str | None:
        """After a worker was lost: None if a worker can still be started and runs the
        daemon's code, else what is wrong. Two tries on fresh pools: a forkserver that died
        with its workers is started again on the second."""
        problem = None
        for attempt in range(2):
            if attempt:
                self._reset()
                time.sleep(0.5)
            try:
                pool = self._ensure_pool()
            except Exception as exc:
                problem = self._problem(exc)
                continue
            problem = self._probe(pool)
            if problem is None:
                return None
        self._reset()
        return problem

    def _probe(self, pool, timeout: float = 300.0) -> str | None:
        try:
            info = pool.submit(probe).result(timeout)
        except Exception as exc:
            return self._problem(exc)
        if info.get("package") != self.package:
            return (f"workers import streamdet from {info.get('package')}, the daemon runs "
                    f"{self.package}")
        return None

    def _problem(self, exc: BaseException) -> str:
        from multiprocessing import spawn

        where = f" (see {self.output})" if self.output else ""
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        exe = os.fsdecode(spawn.get_executable())
        if not os.access(exe, os.X_OK):
            text = f"the interpreter {exe} is gone or cannot be run ({text})"
        return f"workers cannot start: {text}{where}"

    def capacity(self) -> int:
        return self.workers

    def submit(self, job: Job) -> None:
        from concurrent.futures.process import BrokenProcessPool

        job_id = job.id
        try:
            pool = self._ensure_pool()
            fut = pool.submit(run_job, job)
        except (BrokenProcessPool, RuntimeError):  # a worker died while idle
            self._reset()
            pool = self._ensure_pool()
            fut = pool.submit(run_job, job)
        self.futures[job_id] = (fut, pool)
        fut.add_done_callback(lambda f, i=job_id: self.completions.put((i, f)))

    def outcome(self, job_id: int, handle) -> JobResult:
        from concurrent.futures.process import BrokenProcessPool

        _, pool = self.futures.pop(job_id, (None, None))
        try:
            return handle.result()
        except BrokenProcessPool as exc:
            if pool is self.pool:  # not a newer pool started since
                self._reset()
            return _lost(exc)
        except BaseException as exc:  # CancelledError, pickling errors, ...
            return _lost(exc)

    def _reset(self) -> None:
        """Drop a broken pool; a new one starts on the next submit."""
        pool, self.pool = self.pool, None
        if pool is not None:
            try:
                pool.shutdown(wait=False, cancel_futures=True)
            except Exception:
                pass

    def processes(self) -> list[int]:
        pool = self.pool
        procs = getattr(pool, "_processes", None) or {}
        return [p.pid for p in list(procs.values()) if p.pid]

    def kill_workers(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def shutdown(self, abandon: bool) -> None:
        pool = self.pool
        if pool is None:
            return
        if abandon:
            pids = self.processes()
            pool.shutdown(wait=False, cancel_futures=True)
            for pid in pids:  # our own workers, by pid; SIGCONT wakes a stopped one
                for sig in (signal.SIGTERM, signal.SIGCONT):
                    try:
                        os.kill(pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            deadline = time.monotonic() + 5
            procs = list((getattr(pool, "_processes", None) or {}).values())
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
            for proc in procs:  # a worker must not outlive the daemon
                if proc.is_alive():
                    proc.kill()
                    proc.join(1)
        else:
            pool.shutdown(wait=True)
        self.pool = None


class DaskExecutor:
    """Each file is one task on an existing Dask ``distributed`` cluster.

    The workers must see INBOX and OUTBOX at the same paths as the daemon, and have
    streamdet installed; the job carries the daemon's CRDS_* variables. Capacity is
    ``--workers`` if given, else the cluster's total worker threads (re-read as the
    cluster grows or shrinks)."""

    name = "dask"

    def __init__(self, address: str, workers: int | None = None, timeout: float = 30.0):
        try:
            from distributed import Client
        except ImportError as exc:  # pragma: no cover
            raise ExecutorError("--dask-scheduler needs the 'distributed' package "
                                "(pip install 'streamdet[dask]')") from exc
        self.address = address
        self.fixed = workers
        self.completions: queue.SimpleQueue[tuple[int, Any]] = queue.SimpleQueue()
        try:
            self.client = Client(address, timeout=timeout, set_as_default=False)
        except Exception as exc:
            raise ExecutorError(f"cannot reach the Dask scheduler at {address}: "
                                f"{type(exc).__name__}: {exc}") from None
        self.futures: dict[int, Any] = {}
        self._cap = 1
        self._cap_at = 0.0

    def describe(self) -> str:
        return f"Dask cluster at {self.address} ({self.capacity()} slots)"

    def start(self) -> None:
        self.capacity()

    def capacity(self) -> int:
        if self.fixed:
            return self.fixed
        now = time.monotonic()
        if now - self._cap_at > 5.0:
            try:
                self._cap = max(1, sum(self.client.nthreads().values()))
            except Exception:
                pass
            self._cap_at = now
        return self._cap

    def submit(self, job: Job) -> None:
        job_id = job.id
        key = f"streamdet-watch-{job_id}-{job.attempt}-{os.getpid()}-{time.time_ns()}"
        fut = self.client.submit(run_job, job, key=key, pure=False, retries=0)
        self.futures[job_id] = fut
        fut.add_done_callback(lambda f, i=job_id: self.completions.put((i, f)))

    def outcome(self, job_id: int, handle) -> JobResult:
        self.futures.pop(job_id, None)
        try:
            return handle.result(timeout=60)
        except BaseException as exc:  # KilledWorker, CancelledError, comm errors
            return _lost(exc)

    def kill_workers(self) -> None:
        pass

    def shutdown(self, abandon: bool) -> None:
        try:
            if abandon and self.futures:
                self.client.cancel(list(self.futures.values()))
            self.client.close(timeout=10)
        except Exception:
            pass

"""Imported once by the local pool's forkserver process, before it forks any worker.

The one-time costs of a worker (numpy/astropy/crds imports, plugin discovery, crds's first
lookup which loads the JWST datamodel schemas: several seconds) are paid here once, and
every worker forked from the server starts warm -- instead of each worker paying them
again, all at the same time, on the same cores. The server's own output goes where the
workers' goes (``STREAMDET_WATCH_WORKER_OUTPUT``), never into the daemon's log.
"""

import os

_output = os.environ.get("STREAMDET_WATCH_WORKER_OUTPUT")
if _output:
    try:
        _fd = os.open(_output, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.dup2(_fd, 1)
        os.dup2(_fd, 2)
        os.close(_fd)
    except OSError:
        pass

from .worker import warm_up  # noqa: E402

warm_up()

"""Imported once by the local pool's forkserver process, before it forks any worker.

The one-time costs of a worker (numpy/astropy/crds imports, plugin discovery, crds's first
lookup which loads the JWST datamodel schemas: several seconds) are paid here once, and
every worker forked from the server starts warm -- instead of each worker paying them
again, all at the same time, on the same cores. The server's own output goes where the
workers' goes (``STREAMDET_WATCH_WORKER_OUTPUT``), never into the daemon's log.
"""

import os

from .worker import redirect_output, warm_up  # light imports only; the heavy ones are in warm_up

redirect_output(os.environ.get("STREAMDET_WATCH_WORKER_OUTPUT"))
warm_up()

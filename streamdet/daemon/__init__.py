"""The watch-folder daemon: ``streamdet watch INBOX --output OUTBOX`` and ``streamdet status``.

* :mod:`.journal`  -- the durable SQLite (WAL) journal of every file and every run;
* :mod:`.watcher`  -- the watchdog observer, the inbox scan, the "is it complete?" rules
  and the path-safety checks;
* :mod:`.intake`   -- what to do with a complete file (a pure decision on observed facts);
* :mod:`.failures` -- what to do after a failed run (the retry policy, pure);
* :mod:`.jobs`     -- the typed job and results that travel to and from the workers;
* :mod:`.executor` -- where files run: a local process pool or a Dask cluster;
* :mod:`.worker`   -- the function a worker runs for one file;
* :mod:`.daemon`   -- the loop that ties them together: gathers the facts, carries out
  the decisions;
* :mod:`.status`   -- the report behind ``streamdet status``;
* :mod:`.cli`      -- the typer commands (kept light: heavy imports happen inside them).

See ``docs/watch.md``.
"""

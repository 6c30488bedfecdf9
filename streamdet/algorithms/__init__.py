"""The steps' algorithms as plain functions over numpy arrays, in the manner of stcal:
no file I/O, no engine types (Step, ExposureMeta, bands), only arrays, numbers and the DQ
bits of ``streamdet.core.dqflags``, so each can be called, and tested against stcal/jwst,
on its own. The step plugins (``streamdet/plugins/<step>.py``) are the thin wrappers that
read the references and parameters and call them; the compiled loops they use are in
``streamdet/_ckernels``."""

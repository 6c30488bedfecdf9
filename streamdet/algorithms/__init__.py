"""The steps' algorithms as plain functions over numpy arrays, in the manner of stcal:
no file I/O and no engine types (steps, exposure metadata, bands), so that each can be
read, called and tested against stcal/jwst on its own. Each ``<step>.py`` here is
wrapped by the thin Step class of ``streamdet/plugins/<step>.py``, which reads the
references and parameters and hands the algorithm its arrays, band by band."""

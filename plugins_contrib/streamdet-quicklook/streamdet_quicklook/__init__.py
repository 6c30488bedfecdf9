"""streamdet-quicklook: an observer plugin that writes ``<base>_quicklook.png`` beside
the products of every exposure streamdet processes (see :mod:`streamdet_quicklook.plugin`)."""

from .plugin import quicklook_path, render_quicklook

__version__ = "0.1.0"
__all__ = ["quicklook_path", "render_quicklook", "__version__"]

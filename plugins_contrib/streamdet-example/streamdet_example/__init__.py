"""streamdet-example: the complete example plugin of docs/plugins.md, installable."""

__version__ = "0.1.0"

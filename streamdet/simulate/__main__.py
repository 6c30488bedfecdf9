"""``python -m streamdet.simulate OUTDIR [...]``: the ``streamdet simulate`` command."""

import sys

from streamdet.cli import main

sys.argv[1:1] = ["simulate"]
main()

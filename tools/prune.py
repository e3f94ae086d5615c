"""`mtkd prune` as a script: `python tools/prune.py ARGS...` (same arguments)."""
import sys

from mtkd.cli import main

sys.exit(main(["prune", *sys.argv[1:]]))

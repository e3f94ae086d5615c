"""`mtkd export` as a script: `python tools/export.py ARGS...` (same arguments)."""
import sys

from mtkd.cli import main

sys.exit(main(["export", *sys.argv[1:]]))

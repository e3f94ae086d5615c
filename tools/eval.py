"""`mtkd eval` as a script: `python tools/eval.py ARGS...` (same arguments)."""
import sys

from mtkd.cli import main

sys.exit(main(["eval", *sys.argv[1:]]))

"""`mtkd train` as a script: `python tools/train.py ARGS...` (same arguments)."""
import sys

from mtkd.cli import main

sys.exit(main(["train", *sys.argv[1:]]))

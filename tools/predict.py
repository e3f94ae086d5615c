"""`mtkd predict` as a script: `python tools/predict.py ARGS...` (same arguments)."""
import sys

from mtkd.cli import main

sys.exit(main(["predict", *sys.argv[1:]]))

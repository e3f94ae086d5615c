#!/usr/bin/env python
"""``mtkd`` command line with fault injection, for ``benchmarks/faults``.

``python benchmarks/faults/hook.py ARGS`` runs ``mtkd ARGS`` exactly as the
``mtkd`` script does (``mtkd.cli.main``), after installing the faults that
these environment variables ask for (none set: no change at all):

* ``MTKD_FAULTS_PAUSE_SAVE=N`` and ``MTKD_FAULTS_MARKER=PATH``: the N-th
  ``torch.save`` of the process (1-based; in ``mtkd train`` every
  ``torch.save`` is a checkpoint save inside
  :func:`mtkd.checkpoint.save_atomic`) writes the first half of the
  checkpoint's bytes into its file, flushes, writes ``PATH`` and then sleeps
  forever, so the caller can ``kill -9`` the process in the middle of an
  atomic checkpoint write, when the temporary file is half written and not
  yet renamed.
* ``MTKD_FAULTS_READ_ONLY=DIR``: creating or opening for writing anything at
  or under ``DIR`` raises ``OSError(EROFS)``, as on a read-only file system
  (a read-only folder cannot be made with permissions when running as root).

The library itself has no such hooks; this file patches ``torch.save``,
``os.open``, ``os.mkdir`` and ``open`` in the child process only.
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PAUSE_SAVE = "MTKD_FAULTS_PAUSE_SAVE"
MARKER = "MTKD_FAULTS_MARKER"
READ_ONLY = "MTKD_FAULTS_READ_ONLY"


def install_pause(n: int, marker: str) -> None:
    """Pause inside the ``n``-th ``torch.save`` after half of its bytes are written (see module doc)."""
    import torch

    real_save = torch.save
    calls = [0]

    def save(obj, f, *args, **kwargs):
        calls[0] += 1
        if calls[0] != n or not hasattr(f, "write"):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        Path(marker).write_text(f"paused in save {n} after {len(data) // 2} of {len(data)} bytes\n")
        while True:
            time.sleep(3600)

    torch.save = save


def install_read_only(folder: str) -> None:
    """Make every write at or under ``folder`` fail with EROFS (see module doc)."""
    root = os.path.realpath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        p = os.path.realpath(os.fsdecode(os.fspath(path)))
        return p == root or p.startswith(root + os.sep)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(os.fspath(path)))

    real_os_open, real_mkdir, real_open = os.open, os.mkdir, builtins.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def os_open(path, flags, *args, **kwargs):
        if flags & write_flags and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    os.open, os.mkdir, builtins.open, io.open = os_open, mkdir, open_, open_


def main() -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if os.environ.get(PAUSE_SAVE):
        install_pause(int(os.environ[PAUSE_SAVE]), os.environ[MARKER])
    if os.environ.get(READ_ONLY):
        install_read_only(os.environ[READ_ONLY])
    from mtkd.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

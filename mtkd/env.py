"""Offline switches for third-party libraries, set only when asked for.

``import mtkd`` leaves the process environment alone. :func:`go_offline`
sets the switches below (each only where unset: a user's own environment
wins) and gives Ultralytics a font so it never downloads one. It is called by
``mtkd --offline ...``, by ``mtkd demo`` (self-contained and offline by
design), by the benchmarks and by the test suite.

Ultralytics and albumentations read these variables when they are imported,
so call :func:`go_offline` before anything imports them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict

#: Variables :func:`go_offline` sets where unset: no DNS probes, update checks,
#: pip auto-installs or Hugging Face Hub requests.
OFFLINE_ENV: Dict[str, str] = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
}


def go_offline() -> Path:
    """Set :data:`OFFLINE_ENV` and ``YOLO_CONFIG_DIR`` where unset; put a font there.

    Ultralytics' ``check_font('Arial.ttf')`` downloads the font unless it is
    found in ``$YOLO_CONFIG_DIR/Ultralytics``; we copy matplotlib's DejaVuSans
    there under that name (``YOLO_CONFIG_DIR`` defaults to
    ``~/.config/mtkd-yolo`` here). Returns the config dir.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cfg = Path(os.environ.setdefault("YOLO_CONFIG_DIR", str(Path.home() / ".config" / "mtkd-yolo")))
    font_dir = cfg / "Ultralytics"
    try:
        font_dir.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            target = font_dir / name
            if not target.exists():
                src = _matplotlib_font()
                if src is not None:
                    shutil.copyfile(src, target)
    except OSError:  # read-only home: Ultralytics then only warns
        pass
    return cfg


def _matplotlib_font() -> Path | None:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return path if path.exists() else None
    except Exception:  # pragma: no cover - matplotlib is a dependency
        return None

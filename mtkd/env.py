"""Keep third-party libraries offline.

Imported first by ``mtkd/__init__.py`` so that Ultralytics and albumentations
never reach the network (DNS probes, update checks, font or AMP-check
downloads). Every value is only a default: a user's own environment wins.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

_DEFAULTS = {
    "YOLO_OFFLINE": "1",
    "YOLO_AUTOINSTALL": "0",
    "YOLO_VERBOSE": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
}


def setup_offline() -> Path:
    """Set offline switches and give Ultralytics a config dir with a font.

    Ultralytics' ``check_font('Arial.ttf')`` downloads the font unless it is
    found in ``$YOLO_CONFIG_DIR/Ultralytics``; we copy matplotlib's DejaVuSans
    there under that name. Returns the config dir.
    """
    for key, value in _DEFAULTS.items():
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

"""Shared test set-up: offline switches, one thread per process, a temp YOLO dir.

The offline switches are set here, at import, before any test module imports
Ultralytics or albumentations (``import mtkd`` itself sets nothing).
"""
import os
import tempfile

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="mtkd-yolo-"))
os.environ.setdefault("YOLO_VERBOSE", "False")  # quiet Ultralytics in test logs (tests only)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mtkd.env import go_offline  # noqa: E402

go_offline()

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

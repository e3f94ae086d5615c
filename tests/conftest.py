"""Shared test set-up: offline switches, one thread per process, a temp YOLO dir."""
import os
import tempfile

os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="mtkd-yolo-"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import mtkd  # noqa: E402,F401  (sets the offline switches before anything else)
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

"""mtkd: multi-task knowledge distillation for detection and segmentation."""
from mtkd.env import setup_offline as _setup_offline

_setup_offline()

__version__ = "0.1.0"

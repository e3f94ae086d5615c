"""mtkd: multi-task knowledge distillation for detection and segmentation.

Importing mtkd changes nothing in the process environment; see
:func:`mtkd.env.go_offline` (``mtkd --offline``) for the offline switches.
"""

__version__ = "0.1.0"

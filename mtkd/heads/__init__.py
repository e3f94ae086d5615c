"""Task heads: the YOLO-style detection head (with objectness), the
segmentation head, and the detection decoder."""
from mtkd.heads.decode import decode
from mtkd.heads.det import DetHead
from mtkd.heads.seg import SegHead

__all__ = ["DetHead", "SegHead", "decode"]

"""LwM: Grad-CAM attention distillation (from Learning without Memorizing).

Dhar et al., "Learning without Memorizing", CVPR 2019,
https://arxiv.org/pdf/1811.08051.pdf

LwM is an incremental-learning method; as in the reference it is reduced here
to its attention-distillation term. Reference
(AberHu/Knowledge-Distillation-Zoo ``kd_losses/lwm.py``),
``LwM()(out_s, fm_s, out_t, fm_t, target)``, for each model:

* ``g = d out[b, target[b]] / d fm`` (the feature map's gradient);
* ``w = avgpool_hw(g)`` (B, C, 1, 1);
* ``cam = relu(sum_c w * g)`` flattened per sample and L2-normalised;

the loss is ``l1`` (mean over B x HW) between the student's CAM and the
detached teacher's. Note the reference weights the *gradient* ``g`` (not the
activation ``fm`` as in Grad-CAM proper); this is kept so that values match
the reference. The student's gradient is taken with ``create_graph=True``
(double backward trains the student); the teacher's is detached, so it is
taken without it (same value).

The adapter uses one feature map, ``feat`` (default ``"f3"``, a middle stage
as the reference's second of three residual stages); student and teacher
maps must have the same spatial size; ``teacher_feat`` names the teacher's
map when the two backbones' strides differ (e.g. student ``f3`` at stride 8,
teacher ``f2``). It needs the teacher's graph
(``teacher_grad``) and, as in the reference, input gradients
(``input_grad``), so that the teacher's map is differentiable even with
frozen teacher weights. Classification only: ConfigError without ``"logits"``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.errors import ConfigError
from mtkd.losses._common import need_teacher
from mtkd.losses.base import Loss, register
from mtkd.losses.zoo._adapt import get_feature
from mtkd.losses.zoo.sobolev import check_graph, classification_inputs, target_logit_grad


def grad_cam(out: torch.Tensor, fm: torch.Tensor, target: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """(B, H*W) L2-normalised CAM as the reference computes it (module doc)."""
    g = target_logit_grad(out, fm, target, create_graph)
    weights = F.adaptive_avg_pool2d(g, 1)
    cam = F.relu(torch.sum(weights * g, dim=1, keepdim=True))
    return F.normalize(cam.reshape(cam.shape[0], -1), p=2, dim=1)


class LwM(nn.Module):
    """Tensor core: L1 between the normalised Grad-CAMs of student and teacher."""

    def forward(self, out_s: torch.Tensor, fm_s: torch.Tensor, out_t: torch.Tensor, fm_t: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        cam_t = grad_cam(out_t, fm_t, target, create_graph=False)
        cam_s = grad_cam(out_s, fm_s, target, create_graph=True)
        return F.l1_loss(cam_s, cam_t.detach())


@register("lwm")
class LwMLoss(Loss):
    """Adapter: :class:`LwM` on ``out["logits"]``, feature map ``feat`` and
    ``batch["labels"]`` (classification only)."""

    requires = frozenset({"teacher", "teacher_grad", "input_grad", "labels"})

    def __init__(self, feat: str = "f3", teacher_feat: Optional[str] = None):
        super().__init__()
        self.feat = feat
        # the teacher's map may have another name when the two backbones' strides differ
        self.teacher_feat = teacher_feat or feat
        self.core = LwM()

    def forward(self, student_out: Dict[str, Any], teacher_out: Optional[Dict[str, Any]],
                batch: Dict[str, Any]) -> torch.Tensor:
        teacher_out = need_teacher("lwm", teacher_out)
        out_s, out_t, target = classification_inputs(student_out, teacher_out, batch, "lwm")
        fm_s = get_feature(student_out, self.feat, "lwm")
        fm_t = get_feature(teacher_out, self.teacher_feat, "lwm")
        check_graph(fm_t, f"the teacher's feature {self.teacher_feat!r}", "lwm")
        if fm_s.shape[2:] != fm_t.shape[2:]:
            raise ConfigError(f"loss 'lwm': feat: {self.feat!r} has spatial size {tuple(fm_s.shape[2:])} "
                              f"in the student and {self.teacher_feat!r} {tuple(fm_t.shape[2:])} in the teacher; "
                              f"pick maps of one stride with feat / teacher_feat")
        return self.core(out_s, fm_s, out_t, fm_t, target)

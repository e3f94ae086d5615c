"""mtkd.yolo.losses and the KD criterion, without a training run."""
import copy
import pickle

import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.structures import DetOutput
from mtkd.yolo.adapter import forward_detoutput, neck_channels
from mtkd.losses._functional import binary_kl
from mtkd.yolo.losses import YoloKD

ALL_ON = dict(cls=1.0, dfl=0.5, obj=0.5, feat=1.0, t=2.0)


def _model(cfg: str, nc: int = 3):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg()
    return model


@pytest.mark.parametrize("cfg,box_name", [("yolov8n.yaml", "kd_dfl"), ("yolo26n.yaml", "kd_box")])
def test_every_term_zero_when_teacher_equals_student(cfg, box_name):
    model = _model(cfg).eval()
    ch = neck_channels(model)
    kd = YoloKD(**ALL_ON, student_channels=ch, teacher_channels=ch)
    det, feats = forward_detoutput(model, torch.rand(2, 3, 64, 64))
    terms = kd(det, det.detach(), feats, {k: v.detach() for k, v in feats.items()})
    assert sorted(terms) == sorted(["kd_cls", box_name, "kd_obj", "kd_feat"])
    for name, value in terms.items():
        assert abs(float(value.detach())) < 1e-5, name


def test_terms_positive_and_reach_student_and_adapters():
    student, teacher = _model("yolov8n.yaml").train(), _model("yolov8s.yaml").eval()
    kd = YoloKD(**ALL_ON, student_channels=neck_channels(student), teacher_channels=neck_channels(teacher))
    assert kd.adapters["p3"].weight.shape[:2] == (128, 64)  # yolov8n p3 64 -> yolov8s p3 128
    x = torch.rand(2, 3, 64, 64)
    s_det, s_feats = forward_detoutput(student, x)
    with torch.no_grad():
        t_det, t_feats = forward_detoutput(teacher, x)
    terms = kd(s_det, t_det, s_feats, t_feats)
    assert all(float(v.detach()) > 0 for v in terms.values())
    sum(terms.values()).backward()
    head = student.model[-1]
    assert head.cv3[0][-1].weight.grad.abs().sum() > 0  # class branch
    assert head.cv2[0][-1].weight.grad.abs().sum() > 0  # box-distribution branch
    assert kd.adapters["p3"].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def _det(cls: torch.Tensor, box: torch.Tensor) -> DetOutput:
    a = cls.shape[1]
    return DetOutput(cls=cls, obj=cls.max(-1).values, box=box, anchors=torch.zeros(a, 2),
                     strides=torch.ones(a, 1), obj_is_proxy=True)


def test_teacher_score_gating():
    """Anchors the teacher scores ~0 add nothing to kd_cls; confident ones dominate."""
    kd = YoloKD(cls=1.0, dfl=0.0, obj=0.0)
    box = torch.zeros(1, 2, 4)
    teacher = _det(torch.tensor([[[-30.0, -30.0], [6.0, -6.0]]]), box)  # anchor 0: background
    agree_on_1 = _det(torch.tensor([[[5.0, 5.0], [6.0, -6.0]]]), box)  # wrong only on anchor 0
    wrong_on_1 = _det(torch.tensor([[[-30.0, -30.0], [-6.0, 6.0]]]), box)  # wrong only on anchor 1
    assert float(kd(agree_on_1, teacher)["kd_cls"]) < 1e-6
    assert float(kd(wrong_on_1, teacher)["kd_cls"]) > 1.0


def test_binary_kl_matches_closed_form():
    s, t = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([1.5, -1.0, 4.0])
    p, q = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    ref = (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()) * 4
    torch.testing.assert_close(binary_kl(s, t, 2.0) * 4, ref)


def test_real_objectness_teacher_is_distilled_through_its_joint_score():
    kd = YoloKD(cls=1.0, dfl=0.0, obj=0.0)
    cls_t, obj_t = torch.tensor([[[2.0, -1.0]]]), torch.tensor([[0.5]])
    teacher = DetOutput(cls=cls_t, obj=obj_t, box=torch.zeros(1, 1, 4), anchors=torch.zeros(1, 2),
                        strides=torch.ones(1, 1), obj_is_proxy=False)
    joint = torch.logit(torch.sigmoid(cls_t) * torch.sigmoid(obj_t))
    assert float(kd(_det(joint, torch.zeros(1, 1, 4)), teacher)["kd_cls"]) < 1e-6
    assert float(kd(_det(cls_t, torch.zeros(1, 1, 4)), teacher)["kd_cls"]) > 1e-3


def test_zero_weights_switch_terms_off_and_bad_values_are_config_errors():
    det = _det(torch.randn(1, 3, 2), torch.rand(1, 3, 4))
    assert sorted(YoloKD(cls=1.0, dfl=0.0, obj=0.0)(det, det)) == ["kd_cls"]
    with pytest.raises(ConfigError, match="kd_obj"):
        YoloKD(obj=-1.0)
    with pytest.raises(ConfigError, match="kd_t"):
        YoloKD(t=0.0)
    with pytest.raises(ConfigError, match="kd_feat"):
        YoloKD(feat=1.0)  # needs neck widths
    other = _det(torch.randn(1, 3, 5), torch.rand(1, 3, 4))
    with pytest.raises(ConfigError, match="kd_teacher"):
        YoloKD()(det, other)


def test_kd_criterion_appends_named_terms_and_copies_as_plain():
    """On YOLO26 (E2E loss, reg_max=1): the loss vector grows by the KD terms;
    copies and pickles of the student carry only Ultralytics' criterion."""
    from ultralytics.utils.loss import E2ELoss

    from mtkd.teachers import YoloTeacher
    from mtkd.yolo.trainer import KDCriterion

    student = _model("yolo26n.yaml").train()
    teacher = YoloTeacher(_model("yolov8n.yaml"), "test")
    kd = YoloKD(cls=1.0, dfl=1.0, obj=1.0, feat=1.0, student_channels=neck_channels(student),
                teacher_channels=teacher.channels)
    student.criterion = KDCriterion(student.init_criterion(), student.model[-1], teacher, kd)
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.2, 0.4]])}
    loss, items = student(batch)
    assert list(items) == ["box_loss", "cls_loss", "l1_loss", "kd_cls", "kd_box", "kd_obj", "kd_feat"]
    assert loss.shape == (7,)
    torch.testing.assert_close(loss[3:], torch.stack([items[k] for k in list(items)[3:]]) * 2)
    loss.sum().backward()
    assert kd.adapters["p5"].weight.grad is not None
    assert isinstance(copy.deepcopy(student).criterion, E2ELoss)
    blob = pickle.dumps(student)
    assert b"mtkd" not in blob
    assert isinstance(pickle.loads(blob).criterion, E2ELoss)


@pytest.mark.parametrize("kind", ["yolo", "mtkd"])
def test_no_kd_term_exceeds_twice_the_hard_loss_at_step_1(kind):
    """Default weights, a fresh yolov8n student: every KD term stays below twice Ultralytics' hard loss,
    for a fresh YOLO teacher and for an mtkd teacher sure of objectness everywhere (bias +4, the case
    where a dense objectness KL against a joint-score mass ran away)."""
    from mtkd.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
    from mtkd.models import build_model
    from mtkd.teachers import MtkdTeacher, YoloTeacher
    from mtkd.yolo.trainer import KD_DEFAULTS, KDCriterion

    if kind == "yolo":
        teacher = YoloTeacher(_model("yolov8n.yaml"), "test")
    else:
        t_model = build_model({"preset": "student"}, 3).eval().requires_grad_(False)
        for conv in t_model.det_head.obj_pred:
            torch.nn.init.constant_(conv.bias, 4.0)
        teacher = MtkdTeacher(t_model, IMAGENET_MEAN, IMAGENET_STD, "test")
    student = _model("yolov8n.yaml").train()
    kd = YoloKD(cls=KD_DEFAULTS["kd_cls"], dfl=KD_DEFAULTS["kd_dfl"], obj=KD_DEFAULTS["kd_obj"],
                feat=KD_DEFAULTS["kd_feat"], t=KD_DEFAULTS["kd_t"])
    base = student.init_criterion()
    student.criterion = KDCriterion(base, student.model[-1], teacher, kd)
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]),
             "cls": torch.tensor([[0.0], [2.0]]), "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.3, 0.3, 0.2, 0.4]])}
    loss, items = student(batch)
    hard = float(loss[:3].detach().sum())
    terms = {k: float(v) for k, v in zip(list(items)[3:], loss[3:].detach())}
    assert set(terms) == {"kd_cls", "kd_dfl", "kd_obj"} and hard > 0 and terms["kd_obj"] > 0
    assert all(v < 2 * hard for v in terms.values()), (terms, hard)

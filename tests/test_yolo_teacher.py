"""mtkd.yolo.teacher: an mtkd multi-task teacher (checkpoint or YAML) distilling into a YOLO student."""
import pytest
import torch
import yaml

from mtkd.errors import ConfigError
from mtkd.yolo.adapter import forward_detoutput, neck_channels
from mtkd.yolo.losses import YoloKD
from mtkd.yolo.teacher import MtkdTeacher, build_teacher


@pytest.fixture(scope="module")
def mtkd_ckpt(tmp_path_factory):
    from mtkd.models import build_model

    path = tmp_path_factory.mktemp("teacher") / "mt.pt"
    model = build_model({"preset": "student"}, 3)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    torch.save({"format": "mtkd-ckpt-1", "model": model.state_dict(), "classes": ["a", "b", "c"],
                "config": {"model": {"preset": "student"}, "data": {"mean": mean, "std": std}}}, path)
    return path


def test_mtkd_checkpoint_teacher_feeds_yolo_kd(mtkd_ckpt):
    from ultralytics.nn.tasks import DetectionModel

    teacher = build_teacher(str(mtkd_ckpt), 3, torch.device("cpu"))
    assert isinstance(teacher, MtkdTeacher)
    assert teacher.nc == 3 and teacher.strides == (8, 16, 32) and sorted(teacher.channels) == ["p3", "p4", "p5"]
    torch.testing.assert_close(teacher.mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))  # the checkpoint's own
    student = DetectionModel("yolov8n.yaml", nc=3, verbose=False).train()
    x = torch.rand(2, 3, 64, 96)
    s_det, s_feats = forward_detoutput(student, x)
    t_det, t_feats = teacher(x)
    assert t_det.cls.shape == s_det.cls.shape and not t_det.cls.requires_grad
    kd = YoloKD(feat=1.0, student_channels=neck_channels(student), teacher_channels=teacher.channels)
    terms = kd(s_det, t_det, s_feats, t_feats)
    assert set(terms) == {"kd_cls", "kd_dfl", "kd_obj", "kd_feat"}  # mtkd's head has DFL bins too
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())


def test_mtkd_teacher_class_mismatch(mtkd_ckpt):
    with pytest.raises(ConfigError, match="3 classes but the student has 5"):
        build_teacher(str(mtkd_ckpt), 5, torch.device("cpu"))


def test_teacher_yaml_section(tmp_path, mtkd_ckpt):
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"ckpt": str(mtkd_ckpt)}}))
    teacher = build_teacher(str(cfg), 3, torch.device("cpu"))
    det, feats = teacher(torch.rand(1, 3, 64, 64))
    assert det.cls.shape == (1, 84, 3) and feats["p5"].shape[-2:] == (2, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="kd_teacher"):
        build_teacher(str(bad), 3, torch.device("cpu"))


def test_yolo_teacher_keeps_one2many_of_an_end2end_model(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    model.end2end = True  # as YOLO26 checkpoints ship
    path = tmp_path / "y26.pt"
    torch.save({"model": model, "train_args": {}}, path)
    teacher = build_teacher(str(path), 3, torch.device("cpu"))
    x = torch.rand(1, 3, 64, 64)
    det, _ = teacher(x)
    model.eval()
    with torch.no_grad():
        ref, _ = forward_detoutput(model, x)  # unfused, one2many branch
    torch.testing.assert_close(det.cls, ref.cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.box, ref.box, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="not found"):
        build_teacher(str(tmp_path / "missing.pt"), 3, torch.device("cpu"))

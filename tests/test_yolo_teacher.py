"""mtkd.yolo.teacher: YOLO and mtkd teachers for a YOLO student; what is refused, and how."""
import pytest
import torch
import yaml

from mtkd.errors import ConfigError
from mtkd.teachers import MtkdTeacher
from mtkd.yolo.adapter import forward_detoutput, neck_channels
from mtkd.yolo.losses import YoloKD
from mtkd.yolo.teacher import build_teacher

ABC = ["a", "b", "c"]


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

    teacher = build_teacher(str(mtkd_ckpt), ABC, torch.device("cpu"))
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
    with pytest.raises(ConfigError, match="has 3 classes but the student .* has 5"):
        build_teacher(str(mtkd_ckpt), ABC + ["d", "e"], torch.device("cpu"))
    with pytest.raises(ConfigError, match="class 1 is 'b' but the data's is 'B'; set kd_names_ok=true"):
        build_teacher(str(mtkd_ckpt), ["a", "B", "c"])
    assert build_teacher(str(mtkd_ckpt), ["a", "B", "c"], names_ok=True).names == ABC


def test_directory_and_yaml_teachers_are_refused_by_what_they_are(tmp_path, mtkd_ckpt):
    with pytest.raises(ConfigError, match=f"kd_teacher: {tmp_path} is a directory; give the teacher's checkpoint"):
        build_teacher(str(tmp_path), ABC)
    for text in (yaml.safe_dump({"teacher": {"ckpt": str(mtkd_ckpt)}}), "nc: 3\nbackbone: []\nhead: []\n"):
        cfg = tmp_path / "teacher.yaml"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=r"kd_teacher: .*teacher.yaml is a YAML file; the teacher must be "
                                              r"trained weights"):
            build_teacher(str(cfg), ABC)


def test_segmentation_teacher_is_refused(tmp_path):
    from ultralytics.nn.tasks import SegmentationModel

    path = tmp_path / "seg.pt"
    torch.save({"model": SegmentationModel("yolov8n-seg.yaml", nc=3, verbose=False), "train_args": {}}, path)
    with pytest.raises(ConfigError, match=r"kd_teacher: .*seg.pt is a segment model; distillation needs an "
                                          r"Ultralytics detection model"):
        build_teacher(str(path), ABC)


def test_yolo_teacher_keeps_one2many_of_an_end2end_model(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolo26n.yaml", nc=3, verbose=False)
    model.end2end = True  # as YOLO26 checkpoints ship
    path = tmp_path / "y26.pt"
    torch.save({"model": model, "train_args": {}}, path)
    teacher = build_teacher(str(path), ["0", "1", "2"], torch.device("cpu"))
    x = torch.rand(1, 3, 64, 64)
    det, _ = teacher(x)
    model.eval()
    with torch.no_grad():
        ref, _ = forward_detoutput(model, x)  # unfused, one2many branch
    torch.testing.assert_close(det.cls, ref.cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(det.box, ref.box, atol=1e-4, rtol=1e-4)
    with pytest.raises(ConfigError, match="not found"):
        build_teacher(str(tmp_path / "missing.pt"), ABC, torch.device("cpu"))

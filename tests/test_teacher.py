"""load_teacher: frozen mtkd-checkpoint teachers and the YOLO + smp composite."""
from types import SimpleNamespace

import pytest
import torch

from mtkd.errors import ConfigError, MtkdError
from mtkd.models import build_model
from mtkd.structures import DetOutput
from mtkd.teachers import FrozenTeacher, load_teacher

NC = 3
TINY = {"neck_channels": 16, "head_channels": 16, "seg_channels": 32}


def save_mtkd_ckpt(path, model, model_cfg, classes):
    torch.save({"format": "mtkd-ckpt-1", "model": model.state_dict(), "config": {"model": model_cfg},
                "classes": classes}, path)
    return path


def assert_frozen(teacher):
    assert isinstance(teacher, FrozenTeacher)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())


@pytest.fixture(scope="module")
def student():
    return build_model(TINY, NC)


def test_mtkd_checkpoint_teacher_is_frozen_and_matches_source(tmp_path, student):
    source = build_model(TINY, NC)
    # Make BatchNorm statistics non-trivial so eval vs train mode differs.
    source.train()
    with torch.no_grad():
        source(torch.randn(2, 3, 64, 64) * 3 + 1)
    path = save_mtkd_ckpt(tmp_path / "t.pt", source, TINY, ["a", "b", "c"])
    # The shape mtkd/configs/defaults.yaml gives (null composite, empty model: read from the checkpoint).
    cfg = {"ckpt": str(path), "model": {}, "composite": None, "trust_pickle": False}
    teacher = load_teacher(cfg, NC, student=student)
    assert_frozen(teacher)
    assert teacher.num_classes == NC and teacher.strides == (8, 16, 32)
    assert teacher.feat_channels == source.feat_channels
    x = torch.randn(1, 3, 64, 64)
    source.eval()
    with torch.no_grad():
        want, got = source(x), teacher(x)
    assert torch.allclose(want["seg"], got["seg"]) and torch.allclose(want["det"].cls, got["det"].cls)
    # The frozen teacher's output carries no graph to its weights.
    assert not teacher(x)["seg"].requires_grad


def test_mtkd_teacher_mismatch_errors(tmp_path, student):
    source = build_model(TINY, NC)
    path = save_mtkd_ckpt(tmp_path / "t.pt", source, TINY, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="has 3 classes but the student has 5"):
        load_teacher({"ckpt": str(path)}, 5)
    with pytest.raises(ConfigError, match=r"teacher strides \[8, 16, 32\] differ from student strides \[4, 8, 16\]"):
        load_teacher({"ckpt": str(path)}, NC, student=SimpleNamespace(strides=(4, 8, 16)))
    with pytest.raises(ConfigError, match="does not match teacher.model"):
        load_teacher({"ckpt": str(path), "model": {**TINY, "neck_channels": 32}}, NC)
    with pytest.raises(ConfigError, match="teacher.weights: unknown key"):
        load_teacher({"ckpt": str(path), "weights": 1}, NC)
    with pytest.raises(MtkdError, match="not found"):
        load_teacher({"ckpt": str(tmp_path / "missing.pt")}, NC)
    with pytest.raises(ConfigError, match="expected 'ckpt'"):
        load_teacher({"ckpt": None, "composite": None}, NC)
    with pytest.raises(ConfigError, match="either composite or ckpt"):
        load_teacher({"ckpt": str(path), "composite": {"yolo": "yolov8n.yaml"}}, NC)


@pytest.fixture(scope="module")
def composite():
    return load_teacher({"ckpt": None, "model": {}, "trust_pickle": False,
                         "composite": {"yolo": "yolov8n.yaml", "seg": {"arch": "FPN", "encoder": "resnet18"}}}, NC)


def test_composite_teacher_matches_student_layout(composite, student):
    assert_frozen(composite)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        t_out, s_out = composite(x), student.eval()(x)
    t_det, s_det = t_out["det"], s_out["det"]
    assert isinstance(t_det, DetOutput) and t_det.obj_is_proxy
    assert t_det.cls.shape == s_det.cls.shape and t_det.box.shape == s_det.box.shape
    assert t_det.obj.shape == s_det.obj.shape
    assert torch.equal(t_det.anchors, s_det.anchors) and torch.equal(t_det.strides, s_det.strides)
    assert t_out["seg"].shape == s_out["seg"].shape == (2, NC + 1, 64, 64)
    assert set(t_out["feats"]) == {"c2", "c3", "c4", "c5", "p3", "p4", "p5"}
    for name, f in t_out["feats"].items():
        assert f.shape[1] == composite.feat_channels[name]
        assert f.shape[-2:] == s_out["feats"][name].shape[-2:]
    # The detector branch sees 0..1 pixels: a normalised black image maps to 0.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    black = (torch.zeros(1, 3, 64, 64) - mean) / std
    assert torch.allclose(black * composite.model.std + composite.model.mean, torch.zeros(1, 3, 64, 64), atol=1e-6)


def test_composite_checks(tmp_path):
    from ultralytics.nn.tasks import DetectionModel
    import segmentation_models_pytorch as smp

    seg = {"arch": "FPN", "encoder": "resnet18"}
    pt = tmp_path / "yolo.pt"
    torch.save({"model": DetectionModel("yolov8n.yaml", nc=5, verbose=False)}, pt)
    with pytest.raises(ConfigError, match="trust_pickle"):
        load_teacher({"composite": {"yolo": str(pt), "seg": seg}}, NC)
    with pytest.raises(ConfigError, match="YOLO has 5 classes but the student has 3"):
        load_teacher({"trust_pickle": True, "composite": {"yolo": str(pt), "seg": seg}}, NC)
    ckpt = tmp_path / "seg.pt"
    torch.save(smp.create_model("FPN", encoder_name="resnet18", encoder_weights=None, classes=7).state_dict(), ckpt)
    with pytest.raises(ConfigError, match="smp model has 6 classes .* the student has 3"):
        load_teacher({"composite": {"yolo": "yolov8n.yaml", "seg": {**seg, "ckpt": str(ckpt)}}}, NC)
    with pytest.raises(ConfigError, match="teacher strides .* differ from student strides"):
        load_teacher({"composite": {"yolo": "yolov8n.yaml", "seg": seg}}, NC,
                     student=SimpleNamespace(strides=(4, 8, 16)))
    with pytest.raises(ConfigError, match="Wrong architecture"):
        load_teacher({"composite": {"yolo": "yolov8n.yaml", "seg": {"arch": "Nope"}}}, NC)


def test_composite_loads_seg_weights(tmp_path):
    import segmentation_models_pytorch as smp

    source = smp.create_model("FPN", encoder_name="resnet18", encoder_weights=None, classes=NC + 1).eval()
    ckpt = tmp_path / "seg.pt"
    torch.save({"model": source.state_dict()}, ckpt)
    teacher = load_teacher({"composite": {"yolo": "yolov8n.yaml",
                                          "seg": {"arch": "FPN", "encoder": "resnet18", "ckpt": str(ckpt)}}}, NC)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(teacher(x)["seg"], source(x), atol=1e-5)


def test_distillation_losses_run_on_real_student_and_composite_teacher(composite, student):
    from mtkd.losses.composer import LossComposer

    cfg = {"det": {"alpha": 1.0, "soft": [{"name": "det_mse", "gate": True, "gate_thresh": 0.1}]},
           "seg": {"alpha": 1.0, "soft": [{"name": "seg_kl", "T": 2.0}]},
           "extra": [{"name": "feat_gan", "d_channels": 8}, {"name": "cwd", "feats": ["c3", "p4"], "tau": 1.0}]}
    composer = LossComposer(cfg, with_teacher=True)
    composer.bind(student, composite)
    gan = composer.extra["feat_gan"]
    assert set(gan.disc) == {"p3", "p4", "p5"}
    student.train()
    x = torch.randn(2, 3, 64, 64)
    batch = {"masks": torch.randint(0, NC + 1, (2, 64, 64)), "has_seg": torch.tensor([True, False]),
             "letterbox": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 16.0]]),
             "orig_sizes": torch.tensor([[64, 64], [32, 64]])}
    s_out = student(x)
    with torch.no_grad():
        t_out = composite(x)
    total, logs = composer(s_out, t_out, batch)
    assert torch.isfinite(total)
    assert {"det/soft/det_mse/box", "seg/soft/seg_kl", "extra/feat_gan", "extra/cwd"} <= set(logs)
    total.backward()
    assert next(student.backbone.parameters()).grad is not None
    assert all(p.grad is not None for p in composer.student_parameters())
    assert not any(p.grad is not None for p in composite.parameters())
    from mtkd.engine.aux import AuxOptimizers

    aux = AuxOptimizers(composer.modules_flat()).step(1, s_out, t_out, batch)
    assert set(aux) == {"extra/feat_gan/d_loss", "extra/feat_gan/d_real", "extra/feat_gan/d_fake"}

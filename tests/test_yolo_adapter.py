"""mtkd.yolo.adapter: Ultralytics Detect output -> DetOutput."""
import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.yolo.adapter import detect_to_detoutput, forward_detoutput

CFGS = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]


def _model(cfg: str, nc: int = 3):
    from ultralytics.nn.tasks import DetectionModel

    return DetectionModel(cfg, nc=nc, verbose=False)


@pytest.mark.parametrize("cfg", CFGS)
def test_shapes(cfg):
    model = _model(cfg).eval()
    x = torch.rand(2, 3, 64, 96)
    det, feats = forward_detoutput(model, x)
    a = 8 * 12 + 4 * 6 + 2 * 3  # strides 8/16/32 on 64x96
    head = model.model[-1]
    assert det.cls.shape == (2, a, 3)
    assert det.obj.shape == (2, a)
    assert det.box.shape == (2, a, 4)
    assert det.anchors.shape == (a, 2) and det.strides.shape == (a, 1)
    assert det.obj_is_proxy
    assert torch.equal(det.obj, det.cls.max(-1).values)
    if head.reg_max > 1:
        assert det.box_dist.shape == (2, a, 4, head.reg_max)
    else:
        assert det.box_dist is None
    assert sorted(feats) == ["p3", "p4", "p5"]
    assert [feats[k].shape[-2:] for k in ("p3", "p4", "p5")] == [(8, 12), (4, 6), (2, 3)]
    for k, box_branch in zip(("p3", "p4", "p5"), head.cv2):  # exactly what the head's convs consume
        assert feats[k].shape[1] == box_branch[0].conv.in_channels
    assert [lv["cls"].shape for lv in det.levels] == [(2, 3, 8, 12), (2, 3, 4, 6), (2, 3, 2, 3)]
    # the model's modes are left as they were
    assert not model.training and not head.training


@pytest.mark.parametrize("cfg", CFGS)
def test_boxes_and_scores_agree_with_ultralytics_decode(cfg):
    from ultralytics.utils.ops import xywh2xyxy

    model = _model(cfg).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        det, _ = forward_detoutput(model, x)
        y, raw = model(x)  # Ultralytics' own eval decode: xywh pixels + sigmoid scores
        if "one2one" in raw:  # compare on the branch the adapter uses
            y = model.model[-1]._inference(raw["one2many"])
    ref_xyxy = xywh2xyxy(y[:, :4].permute(0, 2, 1))
    torch.testing.assert_close(det.boxes_xyxy(), ref_xyxy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(det.scores(), y[:, 4:].permute(0, 2, 1))


def test_train_mode_output_matches_direct_conversion():
    model = _model("yolov8n.yaml").train()
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    det, _ = forward_detoutput(model, x)
    assert det.cls.requires_grad  # differentiable for a student
    preds = model(x)  # plain train-mode dict
    det2 = detect_to_detoutput(preds, model)
    assert det2.cls.shape == det.cls.shape
    # the DFL expectation lies in [0, reg_max - 1]
    assert det2.box.min() >= 0 and det2.box.max() <= model.model[-1].reg_max - 1


def test_not_a_detection_model():
    with pytest.raises(ConfigError, match="Detect head"):
        forward_detoutput(torch.nn.Conv2d(3, 3, 1), torch.rand(1, 3, 32, 32))

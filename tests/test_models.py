"""Models: backbones by name, output contract, box decoding, presets, config errors."""
import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.heads import decode
from mtkd.models import PRESETS, build_model, model_info
from mtkd.models.backbone import build_backbone
from mtkd.structures import DetOutput
from ultralytics.utils.tal import make_anchors

TINY = {"backbone": "resnet10t", "neck_channels": 16, "head_channels": 16, "seg_channels": 32}


@pytest.mark.parametrize("cfg", [TINY, {**TINY, "backbone": "smp:resnet18", "reg_max": 1, "seg_c2": True}])
def test_output_contract(cfg):
    nc, b, h, w = 3, 2, 64, 96
    model = build_model(cfg, nc).eval()
    with torch.no_grad():
        out = model(torch.randn(b, 3, h, w))
    assert set(out) == {"det", "seg", "feats"}
    assert out["seg"].shape == (b, nc + 1, h, w)
    feats = out["feats"]
    for name, stride in zip(("c2", "c3", "c4", "c5", "p3", "p4", "p5"), (4, 8, 16, 32, 8, 16, 32)):
        assert feats[name].shape == (b, model.feat_channels[name], h // stride, w // stride), name
    det = out["det"]
    a = sum((h // s) * (w // s) for s in model.strides)
    reg_max = cfg.get("reg_max", 16)
    assert det.cls.shape == (b, a, nc) and det.obj.shape == (b, a) and det.box.shape == (b, a, 4)
    assert det.anchors.shape == (a, 2) and det.strides.shape == (a, 1)
    assert (det.box_dist is None) == (reg_max == 1)
    if reg_max > 1:
        assert det.box_dist.shape == (b, a, 4, reg_max)
        expect = (det.box_dist.softmax(-1) * torch.arange(reg_max, dtype=torch.float)).sum(-1)
        torch.testing.assert_close(det.box, expect)
    assert [lv["cls"].shape[1] for lv in det.levels] == [nc] * 3
    assert model.num_classes == nc


def test_heads_optional():
    model = build_model({**TINY, "seg": False}, 2)
    out = model(torch.randn(1, 3, 64, 64))
    assert "seg" not in out and "det" in out
    model = build_model({**TINY, "det": False}, 2)
    out = model(torch.randn(1, 3, 64, 64))
    assert "det" not in out and out["seg"].shape == (1, 3, 64, 64)


def _hand_set_output(nc: int = 2) -> DetOutput:
    """A 64x64 input (levels at strides 8/16/32) with one confident box, predicted twice."""
    feats = [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)]
    anchors, strides = make_anchors(feats, [8, 16, 32], 0.5)
    a = len(anchors)
    cls = torch.full((1, a, nc), -10.0)
    obj = torch.full((1, a), -10.0)
    box = torch.ones(1, a, 4)
    # Anchor (x=2.5, y=3.5) on the stride-8 level = pixel (20, 28); ltrb (1, 2, 3, 1) strides.
    idx = 3 * 8 + 2
    cls[0, idx, 1] = 10.0
    obj[0, idx] = 10.0
    box[0, idx] = torch.tensor([1.0, 2.0, 3.0, 1.0])
    # A duplicate of the same box on the neighbour anchor, a little less confident (NMS removes it).
    cls[0, idx + 1, 1] = 5.0
    obj[0, idx + 1] = 5.0
    box[0, idx + 1] = torch.tensor([2.0, 2.0, 2.0, 1.0])
    return DetOutput(cls=cls, obj=obj, box=box, anchors=anchors, strides=strides)


def test_boxes_xyxy_and_decode():
    det = _hand_set_output()
    expected = torch.tensor([12.0, 12.0, 44.0, 36.0])
    torch.testing.assert_close(det.boxes_xyxy()[0, 3 * 8 + 2], expected)
    res = decode(det, conf=0.25, iou=0.5)
    assert len(res) == 1
    assert res[0]["boxes"].shape == (1, 4)
    torch.testing.assert_close(res[0]["boxes"][0], expected)
    assert res[0]["labels"].tolist() == [1]
    assert res[0]["scores"][0] > 0.99
    # conf=0 lets every anchor through; max_det caps what survives NMS.
    assert len(decode(det, conf=0.0, iou=0.5, max_det=5)[0]["scores"]) == 5


def test_teacher_costs_4x_student():
    student = model_info(build_model(PRESETS["student"], 20), 64, runs=1)
    teacher = model_info(build_model(PRESETS["teacher"], 20), 64, runs=1)
    assert teacher["gflops"] >= 4 * student["gflops"] > 0
    assert teacher["params"] > student["params"] > 0
    assert student["latency_ms"] > 0


def test_build_model_errors():
    with pytest.raises(ConfigError, match=r"model\.neck_width"):
        build_model({"neck_width": 3}, 2)
    with pytest.raises(ConfigError, match=r"model\.reg_max"):
        build_model({"reg_max": "16"}, 2)
    with pytest.raises(ConfigError, match=r"model\.seg_channels"):
        build_model({"seg_channels": 48}, 2)
    with pytest.raises(ConfigError, match=r"model\.preset"):
        build_model({"preset": "huge"}, 2)
    with pytest.raises(ConfigError, match=r"model\.det"):
        build_model({"det": False, "seg": False}, 2)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_backbone("no_such_net")
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_backbone("smp:no_such_encoder")


def test_plain_cnn_encoder_strides_widths_and_bad_width():
    bb = build_backbone("cnn_w8")
    assert bb.channels == (8, 16, 32, 64) and bb.strides == (4, 8, 16, 32)
    maps = bb(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, c, 64 // s, 96 // s) for c, s in zip(bb.channels, bb.strides)]
    with pytest.raises(ConfigError, match="model.backbone.*width"):
        build_backbone("cnn_w0")
    with pytest.raises(ConfigError, match="unknown timm model"):
        build_backbone("cnn_wide")


def test_small_presets_are_plain_cnns_far_apart_in_size():
    student = build_model({"preset": "student_small"}, 8)
    teacher = build_model({"preset": "teacher_small"}, 8)
    assert student.backbone.name == "cnn_w12" and teacher.backbone.name == "cnn_w32"
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    assert 5 <= n_t / n_s <= 20  # 2.06 M vs 0.31 M
    out = student(torch.randn(2, 3, 64, 64))
    assert out["seg"].shape == (2, 9, 64, 64) and out["feats"]["p3"].shape[-2:] == (8, 8)



@pytest.mark.parametrize("shape,size", [((2, 3, 16, 16), (64, 64)), ((2, 3, 5, 7), (13, 29)),
                                        ((1, 2, 8, 8), (4, 4)), ((2, 2, 40, 40), (64, 64))])
def test_resize_bilinear_equals_interpolate_with_gradients(shape, size):
    from mtkd.heads.resize import resize_bilinear
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(shape[0], shape[1], *size, dtype=torch.float64)
    ours = resize_bilinear(x, size)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), x)
    ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), x)
    assert torch.allclose(ours, ref, atol=1e-12) and torch.allclose(g_ours, g_ref, atol=1e-12)


def test_resize_bilinear_exports_to_onnx_as_resize():
    """In an ONNX export the resize stays an interpolation (ONNX Resize), not constant matrices
    of the traced size."""
    onnx = pytest.importorskip("onnx")
    import io

    from mtkd.heads.resize import resize_bilinear

    class Up(torch.nn.Module):
        def forward(self, x):
            return resize_bilinear(x, (32, 32))

    buf = io.BytesIO()
    torch.onnx.export(Up(), (torch.randn(1, 2, 8, 8),), buf, dynamo=False, opset_version=17)
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Resize" in ops and "MatMul" not in ops


def test_resize_bilinear_first_used_in_inference_mode_still_trains():
    """The matrices are cached: one made during evaluation (inference_mode) must not be an
    inference tensor that a later training graph cannot save for backward."""
    from mtkd.heads.resize import resize_bilinear
    with torch.inference_mode():
        resize_bilinear(torch.randn(1, 2, 11, 13), (23, 29))
    x = torch.randn(1, 2, 11, 13, requires_grad=True)
    resize_bilinear(x, (23, 29)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

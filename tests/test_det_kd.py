"""kd_cls, kd_dfl, kd_obj (mtkd.losses.distill.det_kd) and cwd's ``adapt: all``: one set of loss objects
behind ``mtkd yolo train``'s kd_* keys (mtkd.yolo.losses.YoloKD) and the multi-task trainer's ``loss.extra``."""
from types import SimpleNamespace

import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.losses.composer import LossComposer
from mtkd.models import build_model
from mtkd.structures import DetOutput
from mtkd.yolo.losses import YoloKD

S_CH, T_CH = {"p3": 8, "p4": 16, "p5": 16}, {"p3": 12, "p4": 16, "p5": 24}
EXTRA = [{"name": "kd_cls", "weight": 0.5, "T": 3.0}, {"name": "kd_dfl", "weight": 0.25, "T": 3.0},
         {"name": "kd_obj", "weight": 0.1, "T": 3.0},
         {"name": "cwd", "weight": 2.0, "tau": 1.5, "adapt": "all", "feats": ["p3", "p4", "p5"]}]


def _det(g, proxy, reg_max, a=40, nc=4, grad=False):
    cls = (torch.randn(2, a, nc, generator=g) * 3).requires_grad_(grad)
    obj = cls.max(-1).values if proxy else (torch.randn(2, a, generator=g) * 2).requires_grad_(grad)
    dist = (torch.randn(2, a, 4, reg_max, generator=g) * 2).requires_grad_(grad) if reg_max > 1 else None
    return DetOutput(cls=cls, obj=obj, box=(torch.rand(2, a, 4, generator=g) * 5).requires_grad_(grad),
                     anchors=torch.zeros(a, 2), strides=torch.ones(a, 1), box_dist=dist, obj_is_proxy=proxy)


def _feats(g, chans, grad=False):
    return {k: (torch.randn(2, c, 8 >> i, 8 >> i, generator=g)).requires_grad_(grad)
            for i, (k, c) in enumerate(chans.items())}


@pytest.mark.parametrize("t_proxy,s_reg,box", [(True, 16, "dfl"), (False, 16, "dfl"), (False, 1, "box")])
def test_multitask_config_and_yolo_bridge_give_the_same_terms(t_proxy, s_reg, box):
    g = torch.Generator().manual_seed(0)
    s, t = _det(g, True, s_reg, grad=True), _det(g, t_proxy, 16)
    s_f, t_f = _feats(g, S_CH, grad=True), _feats(g, T_CH)
    torch.manual_seed(3)
    bridge = YoloKD(cls=0.5, dfl=0.25, obj=0.1, feat=2.0, t=3.0, feat_t=1.5, student_channels=S_CH,
                    teacher_channels=T_CH)
    torch.manual_seed(3)
    composer = LossComposer({"extra": EXTRA}, with_teacher=True)
    composer.bind(SimpleNamespace(feat_channels=S_CH), SimpleNamespace(feat_channels=T_CH))
    terms = bridge(s, t, s_f, t_f)
    total, logs = composer({"det": s, "feats": s_f}, {"det": t, "feats": t_f}, {})
    assert list(terms) == ["kd_cls", f"kd_{box}", "kd_obj", "kd_feat"]
    assert torch.equal(terms["kd_cls"], 0.5 * logs["extra/kd_cls"])
    assert torch.equal(terms[f"kd_{box}"], 0.25 * logs[f"extra/kd_dfl/{box}"])
    assert torch.equal(terms["kd_obj"], 0.1 * logs["extra/kd_obj"])
    assert torch.equal(terms["kd_feat"], 2.0 * logs["extra/cwd"])
    assert all(float(v.detach()) > 0 for v in terms.values())
    # the same adapters: every level one, the equal-width p4 starting as the identity
    convs = composer.extra["cwd"].adapters.convs
    assert sorted(convs) == sorted(bridge.adapters) == ["p3", "p4", "p5"]
    assert all(torch.equal(convs[k].weight, bridge.adapters[k].weight) for k in convs)
    assert torch.equal(convs["p4"].weight[:, :, 0, 0], torch.eye(16)) and not convs["p4"].bias.any()
    total.backward()
    assert s.cls.grad.abs().sum() > 0 and convs["p3"].weight.grad.abs().sum() > 0


def test_kd_losses_on_multitask_models_zero_when_equal_and_reach_the_student():
    """mtkd heads have a real objectness: both sides are compared through their joint score."""
    torch.manual_seed(0)
    student, teacher = build_model({"preset": "student_small"}, 3), build_model({"preset": "teacher_small"}, 3)
    teacher.eval()
    x = torch.rand(2, 3, 64, 64)
    composer = LossComposer({"extra": EXTRA}, with_teacher=True)
    composer.bind(student, teacher)
    s_out = student(x)
    assert not s_out["det"].obj_is_proxy and s_out["det"].box_dist is not None
    _, logs = LossComposer({"extra": EXTRA[:3]}, with_teacher=True)(s_out, s_out, {})  # teacher = student
    for name in ("kd_cls", "kd_dfl/dfl", "kd_obj"):
        assert abs(float(logs[f"extra/{name}"])) < 1e-5, name
    with torch.no_grad():
        t_out = teacher(x)
    total, logs = composer(s_out, t_out, {})
    assert all(float(logs[f"extra/{n}"]) > 0 for n in ("kd_cls", "kd_dfl/dfl", "kd_obj", "cwd"))
    total.backward()
    head = student.det_head
    assert head.obj_pred[0].weight.grad.abs().sum() > 0  # through sigmoid(cls) * sigmoid(obj)
    assert head.cls_branch[0][-1].weight.grad.abs().sum() > 0 and head.box_pred[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in composer.student_parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_losses_bad_input_is_one_config_error():
    g = torch.Generator().manual_seed(1)
    s = _det(g, True, 16)
    with pytest.raises(ConfigError, match=r"^loss kd_cls\.T: must be > 0, got 0"):
        build_loss("kd_cls", T=0)
    with pytest.raises(ConfigError, match=r"^loss kd_obj: teacher has 5 classes but the student has 4$"):
        build_loss("kd_obj")({"det": s}, {"det": _det(g, True, 16, nc=5)}, {})
    with pytest.raises(ConfigError, match=r"^loss kd_dfl: teacher output has \(2, 30\) \(batch, anchors\)"):
        build_loss("kd_dfl")({"det": s}, {"det": _det(g, True, 16, a=30)}, {})
    with pytest.raises(ConfigError, match=r"^loss kd_cls: the teacher output has no 'det' entry"):
        build_loss("kd_cls")({"det": s}, {"seg": None}, {})
    with pytest.raises(ConfigError, match=r"^loss cwd\.adapt: expected 'differ' or 'all', got 'some'"):
        build_loss("cwd", adapt="some")
    with pytest.raises(ConfigError, match=r"^loss cwd\.adapt: adapters map features"):
        build_loss("cwd", key="seg", adapt="all")

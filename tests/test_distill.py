"""Distillation-core losses: seg_kl, det_mse, feat_gan, cwd (hand-built tensors); pkd and mgd in test_distill_pkd_mgd.py."""
import io
import math
from types import SimpleNamespace

import pytest
import torch

from mtkd.engine.aux import AuxOptimizers
from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.losses.distill.common import letterbox_content, seg_valid_mask
from mtkd.losses.distill.cwd import CWD
from mtkd.structures import VOID, DetOutput


# -- helpers -------------------------------------------------------------------------------
def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def det_output(b=1, a=6, nc=3, requires_grad=False, strides=None):
    def leaf(*shape):
        return torch.randn(*shape).abs().requires_grad_(requires_grad)
    strides = torch.full((a, 1), 8.0) if strides is None else strides
    return DetOutput(cls=leaf(b, a, nc), obj=torch.randn(b, a).requires_grad_(requires_grad), box=leaf(b, a, 4),
                     anchors=torch.rand(a, 2), strides=strides)


def clone_det(d, requires_grad=True):
    return DetOutput(cls=d.cls.detach().clone().requires_grad_(requires_grad),
                     obj=d.obj.detach().clone().requires_grad_(requires_grad),
                     box=d.box.detach().clone().requires_grad_(requires_grad),
                     anchors=d.anchors, strides=d.strides)


def stub(**chans):
    return SimpleNamespace(feat_channels=chans)


def seg_batch(masks, has_seg, letterbox=None, orig_sizes=None):
    batch = {"masks": masks, "has_seg": torch.tensor(has_seg)}
    if letterbox is not None:
        batch["letterbox"] = torch.tensor(letterbox, dtype=torch.float32)
        batch["orig_sizes"] = torch.tensor(orig_sizes)
    return batch


# -- seg_kl ----------------------------------------------------------------------------------
def test_seg_kl_matches_hand_computation_with_void_and_T_squared():
    T = 2.0
    s_vals = [[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]]  # (pixel, class) for the 2 pixels
    t_vals = [[2.0, 0.0, -1.0], [-0.3, 0.7, 0.1]]
    s = torch.tensor(s_vals).t().reshape(1, 3, 1, 2).requires_grad_(True)
    t = torch.tensor(t_vals).t().reshape(1, 3, 1, 2)
    masks = torch.tensor([[[1, VOID]]])
    loss = build_loss("seg_kl", T=T)({"seg": s}, {"seg": t}, seg_batch(masks, [True]))
    ps = softmax([v / T for v in s_vals[0]])
    pt = softmax([v / T for v in t_vals[0]])
    assert loss.item() == pytest.approx(kl(pt, ps) * T * T, rel=1e-5)
    # Both pixels valid: the mean of the two pixel KLs.
    both = build_loss("seg_kl", T=T)({"seg": s}, {"seg": t}, seg_batch(torch.zeros(1, 1, 2, dtype=torch.long), [True]))
    second = kl(softmax([v / T for v in t_vals[1]]), softmax([v / T for v in s_vals[1]]))
    assert both.item() == pytest.approx((kl(pt, ps) + second) / 2 * T * T, rel=1e-5)


def test_seg_kl_zero_when_equal_and_ignores_void_pixels():
    loss_fn = build_loss("seg_kl")
    t = torch.randn(2, 4, 8, 8)
    masks = torch.randint(0, 4, (2, 8, 8))
    masks[:, :3] = VOID
    batch = seg_batch(masks, [True, True])
    assert loss_fn({"seg": t.clone()}, {"seg": t}, batch).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(2, 4, 8, 8)
    base = loss_fn({"seg": s}, {"seg": t}, batch)
    s2 = s.clone()
    s2[:, :, :3] = torch.randn(2, 4, 3, 8) * 10  # only void pixels change
    assert loss_fn({"seg": s2}, {"seg": t}, batch).item() == pytest.approx(base.item(), rel=1e-6)
    s3 = s.clone()
    s3[:, :, 5] += torch.randn(2, 4, 8) * 10  # a labelled row changes
    assert loss_fn({"seg": s3}, {"seg": t}, batch).item() != pytest.approx(base.item(), rel=1e-3)


def test_seg_kl_unlabelled_samples_use_all_pixels_but_letterbox_padding():
    # 8x8 input; original 4x8 (h, w) scaled by 1 and padded 2 rows top and bottom.
    lb, orig = [[1.0, 0.0, 2.0]], [[4, 8]]
    content = letterbox_content({"letterbox": torch.tensor(lb), "orig_sizes": torch.tensor(orig)}, (8, 8))
    assert content[0, 2:6].all() and not content[0, :2].any() and not content[0, 6:].any()
    masks = torch.full((1, 8, 8), VOID)  # the collate's all-VOID mask of an unlabelled sample
    batch = seg_batch(masks, [False], lb, orig)
    loss_fn = build_loss("seg_kl")
    t, s = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    base = loss_fn({"seg": s}, {"seg": t}, batch)
    assert base.item() > 0  # not all-void: unlabelled pixels count
    s_pad = s.clone()
    s_pad[:, :, :2] += 5.0
    s_pad[:, :, 6:] -= 5.0
    assert loss_fn({"seg": s_pad}, {"seg": t}, batch).item() == pytest.approx(base.item(), rel=1e-6)
    s_img = s.clone()
    s_img[:, :, 3] += torch.randn(3, 8) * 5
    assert loss_fn({"seg": s_img}, {"seg": t}, batch).item() != pytest.approx(base.item(), rel=1e-3)
    # A labelled sample with the same all-void mask contributes nothing.
    valid = seg_valid_mask(seg_batch(masks, [True], lb, orig), (8, 8), torch.device("cpu"))
    assert not valid.any()


def test_seg_kl_resizes_teacher_and_checks_classes():
    s = torch.randn(1, 3, 8, 8, requires_grad=True)
    t = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = build_loss("seg_kl")({"seg": s}, {"seg": t}, {})
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    with pytest.raises(ConfigError, match="teacher has 4 classes but the student has 2"):
        build_loss("seg_kl")({"seg": s}, {"seg": torch.randn(1, 5, 8, 8)}, {})


# -- det_mse --------------------------------------------------------------------------------
def test_det_mse_hand_case_and_normalisation():
    t = DetOutput(cls=torch.tensor([[[2.0], [-1.0], [0.5]]]), obj=torch.tensor([[3.0, -3.0, 0.0]]),
                  box=torch.tensor([[[1.0, 1.0, 2.0, 2.0], [0.5, 0.5, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0]]]),
                  anchors=torch.zeros(3, 2), strides=torch.full((3, 1), 8.0))
    s = DetOutput(cls=torch.tensor([[[1.0], [0.0], [0.0]]]), obj=torch.tensor([[1.0, 0.0, 1.0]]),
                  box=torch.tensor([[[1.5, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]]),
                  anchors=torch.zeros(3, 2), strides=torch.full((3, 1), 8.0))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    # Teacher sigmoid(obj) = 0.95, 0.047, 0.5: with thresh 0.4 the fg anchors are 0 and 2 (N = 2).
    out = build_loss("det_mse", gate=True, gate_thresh=0.4, w_box=2.0)({"det": s}, {"det": t}, {})
    obj = sum((sig(a) - sig(b)) ** 2 for a, b in [(1, 3), (0, -3), (1, 0)]) / 2
    box = 2.0 * (0.25 + 1.0 + (0 + 1 + 4 + 9)) / 2
    cls = ((sig(1) - sig(2)) ** 2 + (sig(0) - sig(0.5)) ** 2) / 2
    assert out["obj"].item() == pytest.approx(obj, rel=1e-5)
    assert out["box"].item() == pytest.approx(box, rel=1e-5)
    assert out["cls"].item() == pytest.approx(cls, rel=1e-5)
    # Ungated: box/cls over all anchors, still divided by the fg count.
    ug = build_loss("det_mse", gate=False, gate_thresh=0.4)({"det": s}, {"det": t}, {})
    assert ug["box"].item() == pytest.approx((0.25 + 1.0 + 4 * 0.25 + 14) / 2, rel=1e-5)
    # A higher threshold leaves one fg anchor: N = 1.
    one = build_loss("det_mse", gate=False, gate_thresh=0.9)({"det": s}, {"det": t}, {})
    assert one["obj"].item() == pytest.approx(obj * 2, rel=1e-5)


def test_det_mse_zero_when_equal_and_gating_ignores_background():
    t = det_output(b=2, a=10)
    loss_fn = build_loss("det_mse", gate=True, gate_thresh=0.5)
    zero = loss_fn({"det": clone_det(t)}, {"det": t}, {})
    assert all(v.item() == pytest.approx(0.0, abs=1e-7) for v in zero.values())
    s = det_output(b=2, a=10)
    base = loss_fn({"det": s}, {"det": t}, {})
    bg = t.obj.sigmoid() <= 0.5
    assert bg.any() and (~bg).any()
    s2 = clone_det(s)
    with torch.no_grad():
        s2.box[bg] += 7.0
        s2.cls[bg] -= 3.0
    gated = loss_fn({"det": s2}, {"det": t}, {})
    assert gated["box"].item() == pytest.approx(base["box"].item(), rel=1e-6)
    assert gated["cls"].item() == pytest.approx(base["cls"].item(), rel=1e-6)
    ungated = build_loss("det_mse", gate=False)({"det": s2}, {"det": t}, {})
    assert ungated["box"].item() > base["box"].item()


def test_det_mse_gradients_and_mismatch_errors():
    t = det_output(b=1, a=6, requires_grad=True)
    s = det_output(b=1, a=6, requires_grad=True)
    out = build_loss("det_mse", gate=False)({"det": s}, {"det": t}, {})
    sum(out.values()).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (s.cls, s.obj, s.box))
    assert all(x.grad is None for x in (t.cls, t.obj, t.box))
    with pytest.raises(ConfigError, match="teacher has 5 classes but the student has 3"):
        build_loss("det_mse")({"det": det_output(nc=3)}, {"det": det_output(nc=5)}, {})
    with pytest.raises(ConfigError, match="teacher has 8 anchors but the student has 6"):
        build_loss("det_mse")({"det": det_output(a=6)}, {"det": det_output(a=8)}, {})
    with pytest.raises(ConfigError, match=r"teacher strides \[16\] differ from student strides \[8\]"):
        build_loss("det_mse")({"det": det_output(a=6)},
                              {"det": det_output(a=6, strides=torch.full((6, 1), 16.0))}, {})


# -- feat_gan -------------------------------------------------------------------------------
def gan_outputs(b=2, s_ch=8, t_ch=16, grad=False):
    student = {"feats": {"p3": torch.randn(b, s_ch, 8, 8, requires_grad=grad),
                         "p4": torch.randn(b, s_ch, 4, 4, requires_grad=grad)}}
    teacher = {"feats": {"p3": (torch.randn(b, t_ch, 8, 8) + 1.0).requires_grad_(grad),
                         "p4": (torch.randn(b, t_ch, 4, 4) + 1.0).requires_grad_(grad)}}
    return student, teacher


def bound_gan(**kw):
    gan = build_loss("feat_gan", feats=["p3", "p4"], d_channels=8, **kw)
    gan.bind(stub(p3=8, p4=8), stub(p3=16, p4=16))
    return gan


def d_stepper(gan):
    """``step(student_out, teacher_out) -> logs``: one D step through the trainer's AuxOptimizers."""
    aux = AuxOptimizers([("", gan)])
    return lambda s, t: aux.step(1, s, t, {}), aux


@pytest.mark.parametrize("kind", ["lsgan", "hinge"])
def test_feat_gan_alternating_steps_stay_finite(kind):
    gan = bound_gan(loss=kind, lr_d=1e-3, r1=1.0 if kind == "hinge" else 0.0)
    d_step, _ = d_stepper(gan)
    student_net = torch.nn.Conv2d(4, 8, 1)
    opt = torch.optim.Adam(list(student_net.parameters()) + list(gan.student_parameters()), lr=1e-2)
    _, teacher = gan_outputs()
    x3, x4 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)
    for _ in range(50):
        s_out = {"feats": {"p3": student_net(x3), "p4": student_net(x4)}}
        g = gan(s_out, teacher, {})
        opt.zero_grad()
        g.backward()
        opt.step()
        logs = d_step({"feats": {k: v.detach() for k, v in s_out["feats"].items()}}, teacher)
        assert math.isfinite(g.item()) and all(math.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p).all() for p in gan.parameters())


def test_feat_gan_discriminator_learns_fixed_features():
    gan = bound_gan(lr_d=1e-3)
    d_step, _ = d_stepper(gan)
    student, teacher = gan_outputs()
    losses = [d_step(student, teacher)["d_loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]


def test_feat_gan_d_step_trains_only_d_and_generator_grad_reaches_student():
    gan = bound_gan()
    (group,) = gan.aux_groups()
    assert (group.name, group.optimizer, group.lr, group.betas, group.every) == ("disc", "adam", 1e-4, (0.5, 0.999), 1)
    assert {id(p) for p in group.module.parameters()} == {id(p) for p in gan.disc.parameters()}
    d_step, _ = d_stepper(gan)
    student, teacher = gan_outputs(grad=True)
    g = gan(student, teacher, {})
    g.backward()
    assert student["feats"]["p3"].grad.abs().sum() > 0 and student["feats"]["p4"].grad.abs().sum() > 0
    assert teacher["feats"]["p3"].grad is None
    assert all(p.grad is None for p in gan.disc.parameters())  # D gets nothing from the G term
    adapter_ids = {id(p) for p in gan.student_parameters()}
    assert adapter_ids and not adapter_ids & {id(p) for p in gan.disc.parameters()}
    d_before = [p.detach().clone() for p in gan.disc.parameters()]
    a_before = [p.detach().clone() for p in gan.student_parameters()]
    d_step(student, teacher)
    assert any(not torch.equal(a, b) for a, b in zip(d_before, gan.disc.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(a_before, gan.student_parameters()))
    assert all(not p.requires_grad for p in gan.disc.parameters())


def test_feat_gan_state_round_trips_weights_only():
    gan = bound_gan()
    d_step, aux = d_stepper(gan)
    student, teacher = gan_outputs()
    gan(student, teacher, {})
    d_step(student, teacher)
    buf = io.BytesIO()
    torch.save({"sd": gan.state_dict(), "aux": aux.state_dict()}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert any(k.startswith("disc.") for k in loaded["sd"])
    other = bound_gan()
    other.load_state_dict(loaded["sd"])
    other_step, other_aux = d_stepper(other)
    other_aux.load_state_dict(loaded["aux"])
    assert other_aux.state_dict()["disc"]["state"].keys() == aux.state_dict()["disc"]["state"].keys()
    # Both continue identically.
    d_step(student, teacher)
    other_step(student, teacher)
    for a, b in zip(gan.disc.parameters(), other.disc.parameters()):
        assert torch.equal(a, b)


def test_feat_gan_builds_on_first_forward_without_bind():
    gan = build_loss("feat_gan", feats=["p3", "p4"], d_channels=8)
    assert not list(gan.parameters())
    student, teacher = gan_outputs()
    gan(student, teacher, {})
    assert set(gan.disc) == {"p3", "p4"} and set(gan.adapters.convs) == {"p3", "p4"}
    assert gan.adapters.convs["p3"].weight.shape == (16, 8, 1, 1)
    assert d_stepper(gan)[0](student, teacher)["d_loss"] > 0


def test_feat_gan_d_every_steps_d_on_every_kth_main_step():
    gan = bound_gan(d_every=2)
    aux = AuxOptimizers([("extra/feat_gan", gan)])
    student, teacher = gan_outputs()
    stepped, keys = [], set()
    for step in range(1, 6):
        before = [p.detach().clone() for p in gan.disc.parameters()]
        logs = aux.step(step, student, teacher, {})
        changed = any(not torch.equal(a, b) for a, b in zip(before, gan.disc.parameters()))
        assert changed == bool(logs)
        if logs:
            stepped.append(step)
            keys |= set(logs)
    assert stepped == [2, 4] and keys == {"extra/feat_gan/d_loss", "extra/feat_gan/d_real", "extra/feat_gan/d_fake"}
    assert int(aux.state_dict()["extra/feat_gan/disc"]["state"][0]["step"]) == 2


def test_feat_gan_config_errors():
    with pytest.raises(ConfigError, match="feat_gan.loss"):
        build_loss("feat_gan", loss="wgan")
    with pytest.raises(ConfigError, match="feat_gan.d_every"):
        build_loss("feat_gan", d_every=0)
    with pytest.raises(ConfigError, match="teacher has no feature 'p5'"):
        build_loss("feat_gan", feats=["p5"]).bind(stub(p5=8), stub(p3=16))
    student, teacher = gan_outputs()
    with pytest.raises(ConfigError, match="student has no feature 'p5'"):
        build_loss("feat_gan", feats=["p5"])(student, {"feats": {"p5": torch.zeros(1, 4, 2, 2)}}, {})
    wrong = build_loss("feat_gan", feats=["p3"])
    wrong.bind(stub(p3=8), stub(p3=12))  # feat_channels that disagree with the outputs
    with pytest.raises(ConfigError, match="12 adapted student channels vs 16 teacher channels"):
        wrong(student, teacher, {})


# -- cwd ------------------------------------------------------------------------------------------
def test_cwd_hand_case_and_zero_when_equal():
    tau = 2.0
    s_vals = [[[0.0, 1.0, 2.0, -1.0], [0.5, 0.5, 0.0, 1.0]]]  # (B=1, C=2, HW=4)
    t_vals = [[[1.0, 0.0, 0.0, 2.0], [2.0, -1.0, 0.0, 0.0]]]
    s = torch.tensor(s_vals).reshape(1, 2, 2, 2)
    t = torch.tensor(t_vals).reshape(1, 2, 2, 2)
    loss = CWD(key="seg", tau=tau)({"seg": s}, {"seg": t}, {})
    expect = sum(kl(softmax([v / tau for v in t_vals[0][c]]), softmax([v / tau for v in s_vals[0][c]]))
                 for c in range(2)) * tau * tau / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    feats = {"p3": torch.randn(2, 4, 4, 4), "p4": torch.randn(2, 4, 2, 2)}
    same = build_loss("cwd", feats=["p3", "p4"])({"feats": dict(feats)}, {"feats": feats}, {})
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_adapters_only_where_widths_differ_and_gradients():
    cwd = build_loss("cwd", feats=["p3", "p4"], tau=1.0)
    cwd.bind(stub(p3=4, p4=16), stub(p3=8, p4=16))
    assert set(cwd.adapters.convs) == {"p3"}
    s = {"feats": {"p3": torch.randn(2, 4, 8, 8, requires_grad=True), "p4": torch.randn(2, 16, 4, 4, requires_grad=True)}}
    t = {"feats": {"p3": torch.randn(2, 8, 8, 8, requires_grad=True), "p4": torch.randn(2, 16, 2, 2, requires_grad=True)}}
    loss = cwd(s, t, {})
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s["feats"].values())
    assert all(x.grad is None for x in t["feats"].values())
    assert all(p.grad is not None for p in cwd.student_parameters())
    unbound = build_loss("cwd", feats=["p3", "p4"], tau=1.0)  # adapters made at the first forward
    assert unbound(s, t, {}).item() > 0 and set(unbound.adapters.convs) == {"p3"}


@pytest.mark.parametrize("name", ["seg_kl", "det_mse", "feat_gan", "cwd", "pkd", "mgd", "kd_cls", "kd_dfl", "kd_obj"])
def test_every_loss_requires_a_teacher(name):
    loss = build_loss(name)
    assert "teacher" in loss.requires
    assert loss.__doc__ and ("20" in loss.__doc__)  # cites its paper (year)
    with pytest.raises(ConfigError, match="needs a teacher"):
        loss({"seg": torch.zeros(1, 2, 4, 4)}, None, {})

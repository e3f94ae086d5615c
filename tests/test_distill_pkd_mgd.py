"""PKD and MGD (hand-built tensors, plus one short run through the trainer)."""
import csv
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mtkd.errors import ConfigError
from mtkd.losses import build_loss
from mtkd.losses.distill.mgd import MGD
from mtkd.losses.distill.pkd import PKD


def stub(**chans):
    return SimpleNamespace(feat_channels=chans)


def feats(b=2, widths=(4, 8), sizes=(8, 4), grad=False, shift=0.0):
    return {"feats": {f"p{i + 3}": (torch.randn(b, w, s, s) + shift).requires_grad_(grad)
                      for i, (w, s) in enumerate(zip(widths, sizes))}}


# -- pkd -------------------------------------------------------------------------------------
def np_pkd_level(s, t, eps=1e-6):
    """Direct numpy form: per (sample, channel) z-score over H*W, then mean squared difference / 2."""
    def z(x):
        x = x.astype(np.float64).reshape(x.shape[0], x.shape[1], -1)
        return (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + eps)
    return float(((z(s) - z(t)) ** 2).mean() / 2)


def test_pkd_hand_case_matches_numpy_and_pearson():
    s_vals = [[[1.0, 2.0], [3.0, 6.0]], [[0.0, -1.0], [2.0, 0.5]]]  # (C=2, 2, 2), B=1
    t_vals = [[[2.0, 1.0], [5.0, 3.0]], [[1.0, 1.0], [0.0, 4.0]]]
    s, t = torch.tensor([s_vals]), torch.tensor([t_vals])
    loss = PKD(key="seg")({"seg": s}, {"seg": t}, {})
    assert loss.item() == pytest.approx(np_pkd_level(s.numpy(), t.numpy()), rel=1e-5)
    # = mean over channels of 1 - Pearson r
    r = [np.corrcoef(np.ravel(a), np.ravel(b))[0, 1] for a, b in zip(s_vals, t_vals)]
    assert loss.item() == pytest.approx(float(np.mean([1 - x for x in r])), rel=1e-4)
    # Two levels: the mean of the per-level values; each sample normalised on its own.
    sf, tf = feats(b=3, widths=(4, 4)), feats(b=3, widths=(4, 4))
    two = build_loss("pkd", feats=["p3", "p4"])(sf, tf, {})
    expect = np.mean([np_pkd_level(sf["feats"][k].numpy(), tf["feats"][k].numpy()) for k in ("p3", "p4")])
    assert two.item() == pytest.approx(expect, rel=1e-5)
    # Per-sample statistics: rescaling samples 1: leaves every term as it was (with statistics
    # over the whole batch, as MMRazor's, sample 0's standardised map would change).
    one = build_loss("pkd", feats=["p3"])
    other = sf["feats"]["p3"].clone()
    other[1:] = other[1:] * 50 - 3
    assert one({"feats": {"p3": other}}, tf, {}).item() == pytest.approx(one(sf, tf, {}).item(), rel=1e-4)


def test_pkd_zero_when_equal_and_invariant_to_teacher_affine():
    t = feats(b=2, widths=(4, 8), shift=1.0)
    loss_fn = build_loss("pkd", feats=["p3", "p4"])
    same = {"feats": {k: v.clone() for k, v in t["feats"].items()}}
    assert loss_fn(same, t, {}).item() == pytest.approx(0.0, abs=1e-6)
    s = feats(b=2, widths=(4, 8))
    base = loss_fn(s, t, {}).item()
    assert base > 0.1
    scaled = {"feats": {k: v * 3 + 5 for k, v in t["feats"].items()}}
    assert loss_fn(s, scaled, {}).item() == pytest.approx(base, rel=1e-5)
    per_channel = {"feats": {k: v * torch.rand(1, v.shape[1], 1, 1).add(0.5) + torch.randn(1, v.shape[1], 1, 1) * 4
                             for k, v in t["feats"].items()}}
    assert loss_fn(s, per_channel, {}).item() == pytest.approx(base, rel=1e-5)
    flipped = {"feats": {k: -v for k, v in t["feats"].items()}}  # a negative scale is not invariant
    assert loss_fn(s, flipped, {}).item() != pytest.approx(base, rel=1e-2)


def test_pkd_adapters_only_where_widths_differ_gradients_and_resize():
    pkd = build_loss("pkd", feats=["p3", "p4"])
    pkd.bind(stub(p3=4, p4=16), stub(p3=8, p4=16))
    assert set(pkd.adapters.convs) == {"p3"}
    s = {"feats": {"p3": torch.randn(2, 4, 8, 8, requires_grad=True), "p4": torch.randn(2, 16, 4, 4, requires_grad=True)}}
    t = {"feats": {"p3": torch.randn(2, 8, 8, 8, requires_grad=True), "p4": torch.randn(2, 16, 2, 2, requires_grad=True)}}
    loss = pkd(s, t, {})
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s["feats"].values())
    assert all(x.grad is None for x in t["feats"].values())
    params = list(pkd.student_parameters())
    assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    unbound = build_loss("pkd", feats=["p3", "p4"])  # adapters made at the first forward
    assert unbound(s, t, {}).item() > 0 and set(unbound.adapters.convs) == {"p3"}
    equal = build_loss("pkd", feats=["p4"])
    equal.bind(stub(p4=16), stub(p4=16))
    assert not list(equal.student_parameters())


def test_pkd_seg_logits_and_one_pixel_maps():
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    loss = build_loss("pkd", key="seg")({"seg": s}, {"seg": torch.randn(2, 4, 4, 4)}, {})
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="pkd: teacher has 5 classes but the student has 3"):
        build_loss("pkd", key="seg")({"seg": s}, {"seg": torch.randn(2, 6, 8, 8)}, {})
    tiny = build_loss("pkd", feats=["p5"])({"feats": {"p5": torch.randn(2, 4, 1, 1)}},
                                           {"feats": {"p5": torch.randn(2, 4, 1, 1)}}, {})
    assert tiny.item() == 0.0  # a 1x1 map standardises to 0 (population std), not NaN


def test_pkd_float32_under_autocast():
    s = {"feats": {"p3": torch.randn(2, 4, 8, 8).bfloat16()}}
    t = {"feats": {"p3": torch.randn(2, 4, 8, 8).bfloat16()}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss("pkd", feats=["p3"])(s, t, {})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -- mgd -------------------------------------------------------------------------------------
def bound_mgd(**kw):
    mgd = build_loss("mgd", feats=["p3", "p4"], **kw)
    mgd.bind(stub(p3=4, p4=8), stub(p3=6, p4=8))
    return mgd


def test_mgd_matches_direct_computation():
    mgd = bound_mgd(alpha_mgd=0.5, lambda_mask=0.5)
    s, t = feats(widths=(4, 8)), feats(widths=(6, 8))
    mgd(s, t, {})  # materialises the lazy align convs (their init draws from the RNG too)
    torch.manual_seed(3)
    loss = mgd(s, t, {})
    torch.manual_seed(3)
    expect = 0.0
    for name in ("p3", "p4"):
        a = mgd.adapters.convs[name](s["feats"][name])
        b, _, h, w = a.shape
        keep = (torch.rand(b, 1, h, w) >= 0.5).float()
        assert 0 < keep.mean() < 1
        gen = mgd.generators[name](a * keep)
        expect = expect + ((gen - t["feats"][name]) ** 2).sum() / b
    assert loss.item() == pytest.approx(0.5 * expect.item(), rel=1e-5)
    # align at equal widths too, and the generators keep the teacher's width
    assert set(mgd.adapters.convs) == {"p3", "p4"}
    assert mgd.adapters.convs["p3"].weight.shape == (6, 4, 1, 1)
    assert mgd.generators["p3"][0].weight.shape == (6, 6, 3, 3)
    assert mgd.generators["p4"][2].weight.shape == (8, 8, 3, 3)


def test_mgd_mask_keeps_one_minus_lambda():
    from mtkd.losses.distill.mgd import random_mask
    x = torch.zeros(4, 3, 64, 64)
    for lam in (0.0, 0.65, 0.75):
        mask = random_mask(x, lam)
        assert mask.shape == (4, 1, 64, 64)
        assert mask.mean().item() == pytest.approx(1 - lam, abs=0.02)


def test_mgd_gradients_reach_student_and_generator_not_teacher():
    mgd = bound_mgd()
    s, t = feats(widths=(4, 8), grad=True), feats(widths=(6, 8), grad=True)
    loss = mgd(s, t, {})
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s["feats"].values())
    assert all(x.grad is None for x in t["feats"].values())
    gen_params = list(mgd.generators.parameters())
    assert gen_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen_params)
    ids = {id(p) for p in mgd.student_parameters()}
    assert {id(p) for p in gen_params} <= ids and {id(p) for p in mgd.adapters.parameters()} <= ids


def test_mgd_seeded_masks_reproduce():
    mgd = bound_mgd()
    s, t = feats(widths=(4, 8)), feats(widths=(6, 8))
    mgd(s, t, {})  # materialise the lazy align convs first (their init draws from the RNG)
    values = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        values.append(mgd(s, t, {}).item())
    assert values[0] == values[1]
    assert values[0] != pytest.approx(values[2], rel=1e-4)
    mgd.eval()  # the mask is still drawn in eval mode
    torch.manual_seed(0)
    assert mgd(s, t, {}).item() == values[0]


def test_mgd_one_optimizer_step_updates_its_parameters():
    mgd = build_loss("mgd", feats=["p3", "p4"], alpha_mgd=1e-2)
    assert not list(mgd.student_parameters())  # nothing before bind / first forward
    s, t = feats(widths=(4, 8)), feats(widths=(6, 8))
    mgd(s, t, {})  # built at the first forward, as in the trainer's dry forward
    params = list(mgd.student_parameters())
    assert len(params) == 2 * 2 + 2 * 4  # align w+b and two generator convs w+b, per level
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    opt.zero_grad()
    mgd(s, t, {}).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))


def test_mgd_resizes_teacher_and_runs_under_autocast():
    mgd = build_loss("mgd", feats=["p3"])
    s = {"feats": {"p3": torch.randn(2, 4, 8, 8, requires_grad=True)}}
    t = {"feats": {"p3": torch.randn(2, 6, 4, 4)}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mgd(s, t, {})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s["feats"]["p3"].grad.abs().sum() > 0


# -- both ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,match", [
    (PKD, {"key": "det"}, "pkd.key"),
    (PKD, {"feats": []}, "pkd.feats"),
    (PKD, {"feats": "p3"}, "pkd.feats"),
    (MGD, {"feats": []}, "mgd.feats"),
    (MGD, {"key": "seg"}, "mgd.key"),
    (MGD, {"lambda_mask": 1.0}, "mgd.lambda_mask"),
    (MGD, {"lambda_mask": -0.1}, "mgd.lambda_mask"),
    (MGD, {"alpha_mgd": 0.0}, "mgd.alpha_mgd"),
])
def test_bad_options_are_one_line_config_errors(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_loss(cls.registry_name, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["pkd", "mgd"])
def test_unknown_feature_names(name):
    with pytest.raises(ConfigError, match=f"{name}.feats: the teacher has no feature 'p6'"):
        build_loss(name, feats=["p6"]).bind(stub(p6=4), stub(p3=8))
    with pytest.raises(ConfigError, match=f"{name}.feats: the student has no feature 'p6'"):
        build_loss(name, feats=["p6"])(feats(), {"feats": {"p6": torch.zeros(1, 4, 2, 2)}}, {})
    with pytest.raises(ConfigError, match=f"loss {name}: .*feat_channels"):
        build_loss(name).bind(object(), stub(p3=8))
    with pytest.raises(ConfigError, match="bad arguments for loss"):
        build_loss(name, tau=2.0)


# -- through the trainer ---------------------------------------------------------------------
def test_short_train_with_pkd_and_mgd_extras(tmp_path):
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from benchmarks.common import random_checkpoint
    from mtkd.datasets import SYNTHETIC_CLASSES, make_synthetic
    from mtkd import checkpoint as ckpt_io
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import train

    data = make_synthetic(tmp_path / "data", n_train=8, n_val=2, n_test=2, imgsz=(48, 64), seed=3,
                          formats=("voc",))["voc"]
    # a teacher 1.5x wider in the neck, so PKD needs adapters and MGD's align changes width
    teacher = random_checkpoint(tmp_path / "teacher.pt", {"preset": "student", "neck_channels": 48},
                                SYNTHETIC_CLASSES, seed=1)
    out = tmp_path / "run"
    cfg = load_config(root / "mtkd" / "configs" / "synthetic_kd.yaml", [
        f"data.root={data}", "data.imgsz=64", f"teacher.ckpt={teacher}", f"out={out}", "train.batch=4",
        "train.workers=0", "train.warmup_epochs=0", "train.epochs=1", "train.ema=false", "train.plots=false",
        "train.tensorboard=false", "eval.max_batches=1", "data.augment={hflip: 0.0}",
        "loss.extra=[{name: pkd, weight: 1.0}, {name: mgd, weight: 1.0}]"])
    report = train(cfg)
    assert report["epochs_run"] == 1
    with open(out / "results.csv") as fh:
        row = next(csv.DictReader(fh))
    for term in ("train/extra/pkd", "train/extra/mgd"):
        assert math.isfinite(float(row[term])) and float(row[term]) > 0, (term, row[term])
    state = ckpt_io.load_checkpoint(out / "last.pt")["train_state"]["composer"]
    gen = [k for k in state if ".mgd.generators." in k]
    align = [k for k in state if ".mgd.adapters." in k]
    pkd = [k for k in state if ".pkd.adapters." in k]
    assert gen and align and pkd, sorted(state)[:20]

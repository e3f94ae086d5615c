"""The shared loss maths (mtkd.losses._functional) and the one adapter class give the results
of the formulas they replaced: the old formulas are written out here and compared, alone and
over a few training steps on the synthetic data."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtkd.losses._functional as functional_module
import mtkd.losses.distill.seg_kl as seg_kl_module
from mtkd.datasets import SYNTHETIC_CLASSES, build_dataset, collate, make_synthetic
from mtkd.losses._common import FeatureAdapters
from mtkd.losses._functional import binary_kl, channel_kl, soft_kl
from mtkd.losses.composer import LossComposer
from mtkd.losses.zoo._adapt import FeaturePairs
from mtkd.models import build_model


def old_dense_kl(student, teacher, T=1.0, dim=1, reduction="none"):
    """seg_kl's and cwd's own lines before soft_kl: ``log_pt.exp() * (log_pt - log_ps)``."""
    log_ps = F.log_softmax(student.float() / T, dim=dim)
    log_pt = F.log_softmax(teacher.float() / T, dim=dim)
    kl = log_pt.exp() * (log_pt - log_ps)
    return kl.sum() if reduction == "sum" else kl


def old_batchmean_kl(student, teacher, T=1.0):
    """st's, dml's, bss's and the adversarial losses' line: a softmax (not log) target."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1), reduction="batchmean")


def test_soft_kl_is_the_formulas_it_replaced():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 6, 7, generator=g) * 3, torch.randn(2, 5, 6, 7, generator=g) * 3
    assert torch.equal(soft_kl(s, t, 2.0, dim=1), old_dense_kl(s, t, 2.0, dim=1))
    assert torch.equal(soft_kl(s.flatten(2), t.flatten(2), 4.0, dim=-1, reduction="sum"),
                       old_dense_kl(s.flatten(2), t.flatten(2), 4.0, dim=-1, reduction="sum"))
    # the batchmean users: the same value to float rounding, gradients included
    a, b = torch.randn(8, 10, generator=g, requires_grad=True), torch.randn(8, 10, generator=g)
    new, old = soft_kl(a, b, 3.0, reduction="batchmean"), old_batchmean_kl(a, b, 3.0)
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-7)
    (g_new,), (g_old,) = torch.autograd.grad(new, a), torch.autograd.grad(old, a)
    torch.testing.assert_close(g_new, g_old, rtol=1e-5, atol=1e-8)
    assert new.item() > 0 and soft_kl(a, a.detach(), 3.0, reduction="batchmean").item() == 0.0


def test_binary_kl_and_channel_kl_are_their_formulas():
    """binary_kl against the Bernoulli KL written out, channel_kl against per-channel spatial softmaxes, in float64."""
    g = torch.Generator().manual_seed(1)
    s, t = (torch.randn(3, 7, generator=g, dtype=torch.float64) * 4 for _ in range(2))
    p, q = torch.sigmoid(t / 3), torch.sigmoid(s / 3)
    direct = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    got = binary_kl(s, t, 3.0)
    assert got.dtype == torch.float64 and torch.allclose(got, direct, rtol=1e-10, atol=1e-12)
    assert binary_kl(s.half(), t.half(), 3.0).dtype == torch.float32  # AMP inputs: float32 maths
    assert torch.equal(binary_kl(t, t, 3.0), torch.zeros_like(t))  # clamped at 0, never -rounding
    a, b = (torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64) for _ in range(2))
    tau = 1.5
    ps, pt = (a.flatten(2) / tau).softmax(-1), (b.flatten(2) / tau).softmax(-1)
    per_channel = (pt * (pt.log() - ps.log())).sum(-1)  # (B, C)
    torch.testing.assert_close(channel_kl(a, b, tau), per_channel.mean() * tau ** 2, rtol=1e-12, atol=1e-14)
    assert channel_kl(a, a, tau).item() == 0.0


def test_zoo_adapters_are_the_bias_free_convs_they_were():
    pairs = FeaturePairs("fitnet", ["p3"])
    fs, ft = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    torch.manual_seed(5)
    got = pairs.match("p3", fs, ft)
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, kernel_size=1, bias=False)  # what FeaturePairs made before
    assert torch.equal(pairs.convs["p3"].weight, conv.weight) and pairs.convs["p3"].bias is None
    assert torch.allclose(got, F.interpolate(conv(fs), size=(4, 4), mode="bilinear", align_corners=False), atol=1e-6)
    # the distillation core's adapters keep their bias; a width change is named
    adapters = FeatureAdapters("cwd")
    adapters.to_teacher("p3", fs, 6)
    assert adapters.convs["p3"].bias is not None and set(adapters.convs) == {"p3"}
    assert adapters.to_teacher("p4", fs, 4) is fs
    with pytest.raises(Exception, match=r"^loss 'cwd': feats: 'p3' changed width \(4->6 expected, got 5->6\)"):
        adapters.to_teacher("p3", torch.randn(1, 5, 2, 2), 6)


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("kl")
    roots = make_synthetic(root, n_train=8, n_val=1, n_test=1, imgsz=(48, 64), seed=3, seg_missing=0.25,
                           formats=("voc",))
    ds = build_dataset({"format": "voc", "root": str(roots["voc"]), "imgsz": 64}, "train", train=False)
    items = [ds[i] for i in range(len(ds))]
    return [collate(items[i:i + 4]) for i in (0, 4)]


def _losses(batches, steps=3):
    """Per-step logged losses of a few SGD steps: a student_small learns from a teacher_small."""
    torch.manual_seed(0)
    nc = len(SYNTHETIC_CLASSES)
    student, teacher = build_model({"preset": "student_small"}, nc), build_model({"preset": "teacher_small"}, nc)
    teacher.eval()
    composer = LossComposer({"seg": {"alpha": 0.5, "hard": "seg_ce", "soft": [{"name": "seg_kl", "T": 2.0}]},
                             "extra": [{"name": "cwd", "weight": 12.0, "tau": 4.0},
                                       {"name": "cwd", "as": "cwd_seg", "key": "seg", "tau": 2.0}]},
                            with_teacher=True)
    composer.bind(student, teacher)
    with torch.no_grad():
        composer(student(batches[0]["images"]), teacher(batches[0]["images"]), batches[0])  # makes the adapters
    opt = torch.optim.SGD(list(student.parameters()) + list(composer.student_parameters()), lr=0.05)
    history = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            t_out = teacher(batch["images"])
        total, logs = composer(student(batch["images"]), t_out, batch)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in logs.items()})
    return history


def test_short_training_gives_the_losses_of_the_old_formulas(batches, monkeypatch):
    new = _losses(batches)
    monkeypatch.setattr(seg_kl_module, "soft_kl", old_dense_kl)
    monkeypatch.setattr(functional_module, "soft_kl", old_dense_kl)  # channel_kl's
    old = _losses(batches)
    assert new == old  # bit for bit, every term of every step
    for term in ("seg/soft/seg_kl", "extra/cwd", "extra/cwd_seg"):
        values = [h[term] for h in new]
        assert all(v > 0 for v in values) and len(set(values)) == len(values), term

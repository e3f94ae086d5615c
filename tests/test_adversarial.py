"""Adversarial robustness: attacks, the ``mtkd attack`` report, adversarial distillation losses."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtkd.adversarial import attacks as A
from mtkd.adversarial import make_attack
from mtkd.errors import ConfigError
from mtkd.structures import VOID

MEAN = [0.5, 0.4, 0.3]
STD = [0.2, 0.25, 0.3]


def _pixels(x: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)


def _normalise(p: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    return (p - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


class TinyNet(nn.Module):
    """A small conv classifier returning mtkd's ``{"logits"}`` dict."""

    def __init__(self, nc: int = 3, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(4 * width, nc))

    def forward(self, x):
        return {"logits": self.body(x)}


def _toy_data(n: int = 96, seed: int = 0):
    """0..1 images whose class is the brightest colour channel (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n, 3, 8, 8, generator=g) * 0.6
    y = torch.randint(0, 3, (n,), generator=g)
    p[torch.arange(n), y] += 0.05
    return _normalise(p.clamp(0, 1)), y


@pytest.fixture(scope="module")
def trained():
    """A TinyNet fitted to the toy data (clean accuracy well above chance)."""
    torch.manual_seed(0)
    x, y = _toy_data()
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x)["logits"], y).backward()
        opt.step()
    net.eval()
    acc = (net(x)["logits"].argmax(1) == y).float().mean().item()
    assert acc > 0.8, acc
    return net, x, y


def _ce(net, x, y) -> float:
    with torch.no_grad():
        return F.cross_entropy(net(x)["logits"], y).item()


# -- item 1: attacks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name,start", [("pgd", True), ("pgd", "normal"), ("fgsm", False), ("fgsm", True)])
def test_attack_stays_in_eps_ball_and_pixel_range(trained, name, start):
    net, x, y = trained
    # push some pixels to the range limits so the [0, 1] clamp binds
    p = _pixels(x).clone()
    p[:, :, :2] = 1.0
    p[:, :, -2:] = 0.0
    x = _normalise(p)
    eps = 16 / 255
    spec = make_attack(name, eps, steps=None if name == "fgsm" else 7, random_start=start)
    adv = A.attack_classifier(net, x, spec, y, MEAN, STD)
    q = _pixels(adv)
    assert (q - p).abs().max() <= eps + 1e-5
    assert q.min() >= -1e-5 and q.max() <= 1 + 1e-5
    assert (q - p).abs().max() > eps / 2  # it did move


def test_pgd_zero_steps_without_random_start_returns_the_input(trained):
    net, x, y = trained
    spec = make_attack("pgd", 8 / 255, steps=0, random_start=False)
    assert torch.equal(A.attack_classifier(net, x, spec, y, MEAN, STD), x)


def test_fgsm_raises_the_loss_and_pgd10_raises_it_at_least_as_much(trained):
    net, x, y = trained
    eps = 4 / 255
    clean = _ce(net, x, y)
    fgsm = _ce(net, A.attack_classifier(net, x, make_attack("fgsm", eps), y, MEAN, STD), y)
    pgd = _ce(net, A.attack_classifier(net, x, make_attack("pgd", eps, steps=10), y, MEAN, STD), y)
    assert fgsm > clean * 1.05
    assert pgd >= fgsm - 1e-4 and pgd > clean * 1.05


def test_no_labels_attacks_the_model_own_predictions(trained):
    net, x, y = trained
    spec = make_attack("pgd", 8 / 255, steps=3)
    with torch.no_grad():
        pred = net(x)["logits"].argmax(1)
    a = A.attack_classifier(net, x, spec, None, MEAN, STD, generator=torch.Generator().manual_seed(1))
    b = A.attack_classifier(net, x, spec, pred, MEAN, STD, generator=torch.Generator().manual_seed(1))
    c = A.attack_classifier(net, x, spec, (pred + 1) % 3, MEAN, STD, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_attack_leaves_no_parameter_gradients(trained):
    net, x, y = trained
    net.zero_grad(set_to_none=True)
    A.attack_classifier(net, x, make_attack("pgd", 8 / 255, steps=2), y, MEAN, STD)
    assert all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="pgd", eps=0), "eps: must be > 0"),
    (dict(name="fgsm", eps=-0.1), "eps: must be > 0"),
    (dict(name="pgd", eps=0.01, step_size=0.026), "more than 2.5 x eps"),
    (dict(name="cw", eps=0.01), "unknown attack 'cw'"),
    (dict(name="pgd", eps="8/0"), "expected a number"),
    (dict(name="pgd", eps=0.01, steps=-1), "steps"),
])
def test_attack_settings_errors_are_one_line_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_attack(**kwargs)
    assert "\n" not in str(info.value)


def test_attack_defaults_and_fraction_parsing():
    spec = make_attack("pgd", "8/255")
    assert spec.steps == 10 and spec.random_start == "uniform"
    assert spec.step_size == pytest.approx(2 / 255)
    assert make_attack("fgsm", 0.1).step_size == pytest.approx(0.1)
    assert make_attack("fgsm", 0.1, random_start=True).step_size == pytest.approx(0.125)
    assert A.list_of("4/255, 8/255") == pytest.approx([4 / 255, 8 / 255])


def test_seg_objective_segpgd_weighting():
    logits = torch.randn(1, 3, 4, 4)
    target = logits.argmax(1).clone()
    target[0, 0] = (target[0, 0] + 1) % 3     # first row wrong
    target[0, 3, 3] = VOID
    ce = F.cross_entropy(logits, target, ignore_index=VOID, reduction="none")
    n = (target != VOID).sum()
    correct = (logits.argmax(1) == target)
    plain = A.seg_objective(logits, target, 0, 10)
    assert plain == pytest.approx((ce.sum() / n).item())
    first = A.seg_objective(logits, target, 0, 10, segpgd=True)  # lam = 0: only correct pixels
    assert first == pytest.approx((ce[correct].sum() / n).item())
    last = A.seg_objective(logits, target, 9, 10, segpgd=True)   # lam = 0.45
    expect = (0.55 * ce[correct].sum() + 0.45 * ce[~correct].sum()) / n
    assert last == pytest.approx(expect.item(), rel=1e-5)


@pytest.fixture(scope="module")
def multitask_batch(tmp_path_factory):
    from mtkd.datasets import make_synthetic
    from mtkd.engine.config import load_config
    from mtkd.engine.tasks import get_task
    from mtkd.models import build_model

    tmp = tmp_path_factory.mktemp("advmt")
    roots = make_synthetic(tmp / "d", n_train=2, n_val=3, n_test=2, imgsz=(48, 64), seed=3, formats=("voc",))
    cfg = load_config("small/student.yaml", [f"data.root={roots['voc']}", "data.imgsz=64"])
    task = get_task("multitask")
    ds = task.build_dataset(cfg, "val", False)
    batch = task.collate([ds[i] for i in range(3)])
    torch.manual_seed(0)
    model = build_model({"preset": "student_small"}, len(ds.classes)).eval()
    return model, batch, cfg["data"]["mean"], cfg["data"]["std"]


@pytest.mark.parametrize("seg,det,segpgd", [(True, True, True), (True, False, False), (False, True, False)])
def test_multitask_attack_keeps_letterbox_padding_and_raises_its_loss(multitask_batch, seg, det, segpgd):
    from mtkd.losses.distill.common import letterbox_content

    model, batch, mean, std = multitask_batch
    spec = make_attack("pgd", 8 / 255, steps=3)
    adv = A.attack_multitask(model, batch, spec, mean, std, seg=seg, det=det, segpgd=segpgd)
    delta = _pixels(adv, mean, std) - _pixels(batch["images"], mean, std)
    content = letterbox_content(batch, adv.shape[-2:])
    assert (~content).any(), "the fixture needs letterbox padding"
    assert delta.abs().amax(1)[~content].max() == 0
    assert delta.abs().amax(1)[content].max() > 4 / 255
    assert delta.abs().max() <= 8 / 255 + 1e-5

    # the attacked objective is higher than the clean one
    with torch.no_grad():
        targets = A.multitask_targets(model(batch["images"]), batch)

        def value(x):
            out = model(x)
            v = 0.0
            if seg:
                v += float(A.seg_objective(out["seg"], targets["seg"], 0, 1))
            if det:
                from mtkd.losses.det_hard import YoloDetLoss

                b = {"boxes": targets["boxes"], "labels": targets["labels"],
                     "has_det": torch.ones(len(x), dtype=torch.bool), "images": x}
                v += float(sum(YoloDetLoss()(out, None, b).values()))
            return v

        assert value(adv) > value(batch["images"])


def test_multitask_targets_use_predictions_without_labels(multitask_batch):
    model, batch, _, _ = multitask_batch
    with torch.no_grad():
        clean = model(batch["images"])
    own = A.multitask_targets(clean, batch, use_labels=False, det_conf=0.0)
    labelled = A.multitask_targets(clean, batch, use_labels=True)
    assert torch.equal(labelled["seg"], batch["masks"])
    pred = clean["seg"].argmax(1)
    content = own["seg"] != VOID
    assert torch.equal(own["seg"][content], pred[content])
    assert all(torch.equal(b, t) for b, t in zip(labelled["boxes"], batch["boxes"]))
    assert sum(len(b) for b in own["boxes"]) > 0  # conf 0: the clean detections


def test_sign_noise_has_the_attack_norm():
    x = _normalise(torch.rand(2, 3, 8, 8) * 0.5 + 0.25)
    noisy = A.sign_noise(x, 0.05, MEAN, STD, generator=torch.Generator().manual_seed(0))
    d = _pixels(noisy) - _pixels(x)
    assert torch.allclose(d.abs(), torch.full_like(d, 0.05), atol=1e-5)
    assert 0.3 < (d > 0).float().mean() < 0.7

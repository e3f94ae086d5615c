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


# -- item 2: mtkd attack -------------------------------------------------------------------------
class _Quantised(nn.Module):
    """A model whose input gradient is zero everywhere (gradient masking by rounding the input)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(torch.round(x * 16) / 16)


def _scorer(net, x, y):
    from torch.utils.data import DataLoader

    from mtkd.adversarial.report import _Scorer
    from mtkd.tasks.classify.task import ClassifyTask

    task = ClassifyTask()

    class Items(list):
        classes = ["r", "g", "b"]

    ds = Items({"image": x[i], "label": int(y[i]), "index": i, "id": str(i)} for i in range(len(y)))
    loader = DataLoader(ds, batch_size=32, collate_fn=task.collate)
    cfg = {"eval": {"max_batches": None}, "train": {"amp": False, "batch": 32}}
    return _Scorer(task, net, cfg, ds, loader, torch.device("cpu"), MEAN, STD, {"use_labels": True}, 0)


def test_attacked_loader_feeds_the_evaluator_attacked_images_under_inference_mode(trained):
    net, x, y = trained
    scorer = _scorer(net, x, y)
    clean = scorer.clean()["top1"]
    with torch.inference_mode():  # as an evaluator would be
        attacked = scorer.attacked(make_attack("pgd", 8 / 255, steps=5))["top1"]
    assert clean > 80 and attacked < clean - 20


@pytest.mark.parametrize("masked", [False, True])
def test_masking_checks_flag_a_model_without_input_gradients(trained, masked):
    from mtkd.adversarial.report import masking_checks

    net, x, y = trained
    model = _Quantised(net) if masked else net
    scorer = _scorer(model, x, y)
    spec = make_attack("pgd", 8 / 255, steps=10, random_start=False)
    clean = scorer.clean()
    checks = {c["name"]: c for c in masking_checks(scorer, clean, [(spec.eps, scorer.attacked(spec))], spec)}
    assert set(checks) == {"pgd20<=pgd10", "pgd10<=fgsm", "attacked<=clean", "large_eps_to_zero"}
    if masked:
        assert not checks["large_eps_to_zero"]["passed"]   # rounding hides the gradient: no attack works
        assert checks["large_eps_to_zero"]["values"]["pgd20_large_eps"] == pytest.approx(scorer.score(clean))
    else:
        assert all(c["passed"] for c in checks.values()), checks
        assert checks["large_eps_to_zero"]["values"]["pgd20_large_eps"] == 0.0


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A tiny classify checkpoint (cnn4 student, 3 classes, 24 px, a few steps)."""
    import mtkd.tasks.classify.task  # noqa: F401
    from mtkd.tasks.classify import make_synthetic_imagefolder
    from mtkd.engine.config import build_config
    from mtkd.engine.trainer import train

    tmp = tmp_path_factory.mktemp("advcls")
    root = make_synthetic_imagefolder(tmp / "data", n_classes=3, n_per_class=8, imgsz=24, seed=1)
    cfg = build_config({
        "task": "classify", "out": str(tmp / "run"),
        "data": {"format": "imagefolder", "root": str(root), "imgsz": 24, "mean": None, "std": None},
        "model": {"backbone": "cnn4"},
        "loss": {"det": {}, "seg": {}, "extra": [{"name": "ce"}]},
        "train": {"epochs": 2, "batch": 8, "workers": 0, "ema": False, "tensorboard": False, "plots": False,
                  "device": "cpu", "lr": 0.003},
    })
    train(cfg)
    return tmp, root


def test_mtkd_attack_writes_report_with_clean_at_least_attacked(classify_run, capsys):
    import json

    from mtkd.cli import main

    tmp, _ = classify_run
    out = tmp / "attack"
    code = main(["attack", str(tmp / "run" / "config.yaml"), "--ckpt", str(tmp / "run" / "best.pt"),
                 "--attack", "pgd", "--eps", "2/255,16/255", "--steps", "5", "--out", str(out), "--draw", "2"])
    assert code == 0
    report = json.loads((out / "attack.json").read_text())
    assert [round(r["eps_255"]) for r in report["attacked"]] == [2, 16]
    clean = report["clean"]["top1"]
    attacked = [r["metrics"]["top1"] for r in report["attacked"]]
    assert all(a <= clean for a in attacked) and attacked[-1] <= attacked[0]
    assert report["attack"]["steps"] == 5 and report["attack"]["step_size"][1] == pytest.approx(2.5 * 16 / 255 / 5)
    assert {c["name"] for c in report["checks"]} >= {"pgd20<=pgd10", "pgd10<=fgsm", "large_eps_to_zero"}
    assert (out / "attack_curve.png").stat().st_size > 0 and (out / "attack_examples.png").stat().st_size > 0
    assert "clean" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [(["--attack", "cw"], "unknown attack 'cw'"),
                                        (["--eps", "0"], "eps: must be > 0"),
                                        (["--eps", "4/255", "--step-size", "11/255"], "more than 2.5 x eps")])
def test_mtkd_attack_bad_settings_exit_2_with_one_line(classify_run, capsys, args, match):
    from mtkd.cli import main

    tmp, _ = classify_run
    code = main(["attack", str(tmp / "run" / "config.yaml"), "--ckpt", str(tmp / "run" / "best.pt"),
                 "--out", str(tmp / "bad"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and match in err and "\n" not in err


# -- item 3: adversarial distillation as losses --------------------------------------------------
class BNNet(TinyNet):
    """TinyNet with a BatchNorm (to see whether crafting touches running statistics)."""

    def __init__(self, nc: int = 3, width: int = 8):
        super().__init__(nc, width)
        self.body.insert(1, nn.BatchNorm2d(width))


def _composer(entry, with_teacher=True):
    from mtkd.losses.composer import LossComposer

    comp = LossComposer({"extra": [entry]}, with_teacher=with_teacher)
    comp.bind_input(MEAN, STD)
    return comp


def _step(comp, student, teacher, x, y, opt):
    """What the trainer does: pre_step, one student forward on cat([x, x']), split, loss, step."""
    from mtkd.engine.trainer import split_output

    batch = comp.pre_step({"images": x, "labels": y}, student, teacher)
    n = len(x)
    s_out, s_adv = split_output(student(torch.cat([x, batch["adv_images"]])), n)
    s_out["adv"] = s_adv
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            if "adv_teacher" in comp.requires:
                t_out, t_adv = split_output(teacher(torch.cat([x, batch["adv_images"]])), n)
                t_out["adv"] = t_adv
            else:
                t_out = teacher(x)
    total, logs = comp(s_out, t_out, batch)
    opt.zero_grad()
    total.backward()
    grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
    opt.step()
    return batch, total, logs, grads


PRESET_TABLE = {
    "ard": dict(source="student", objective="ce", target="clean", T=30.0, w_adv=1.0, w_clean=0.0, w_ce=0.0,
                random_start="uniform"),
    "rslad": dict(source="student", objective="kl", target="clean", T=1.0, w_adv=5 / 6, w_clean=1 / 6, w_ce=0.0,
                  random_start="uniform"),
    "adaad": dict(source="student", objective="kl", target="adv", T=1.0, w_adv=1.0, w_clean=0.0, w_ce=0.0,
                  random_start="normal"),
    "kd_adv": dict(source="teacher", objective="ce", target="adv", T=1.0, w_adv=1.0, w_clean=1.0, w_ce=0.0,
                   random_start="uniform"),
}


@pytest.mark.parametrize("preset", sorted(PRESET_TABLE))
def test_presets_resolve_to_the_documented_options(preset):
    from mtkd.losses import build_loss

    loss = build_loss("adv_kd", preset=preset)
    for k, v in PRESET_TABLE[preset].items():
        assert loss.options[k] == pytest.approx(v) if isinstance(v, float) else loss.options[k] == v, k
    assert loss.attack.eps == pytest.approx(8 / 255) and loss.attack.steps == 10
    assert loss.attack.step_size == pytest.approx(2 / 255)
    assert ("adv_teacher" in loss.requires) == (PRESET_TABLE[preset]["target"] == "adv")
    assert {"teacher", "adv_split"} <= loss.requires
    # an explicit option wins over the preset
    assert build_loss("adv_kd", preset=preset, w_adv=0.5, steps=3).options["w_adv"] == 0.5


@pytest.mark.parametrize("kwargs,match", [
    (dict(preset="madry"), "unknown preset 'madry'"),
    (dict(preset="rslad", eps=0), "eps: must be > 0"),
    (dict(preset="rslad", eps=0.01, step_size=0.03), "more than 2.5 x eps"),
    (dict(source="teacher", objective="kl", target="adv"), "teacher with itself"),
    (dict(w_adv=0), "all 0"),
    (dict(target="both"), "adv_kd.target"),
    (dict(output="multitask", preset="rslad"), "takes no preset"),
    (dict(output="multitask", w_ce=0.5), "w_ce: not used"),
    (dict(preset="rslad", det_kd={"w_obj": 10}), "only with output multitask"),
    (dict(black_box=True, source="teacher", objective="ce"), "black_box: needs"),
    (dict(black_box=True, preset="ard", w_ce=0.5), "black_box: needs"),
    (dict(output="multitask", det_kd={"w_nope": 1}), "loss adv_kd.det_kd: bad arguments"),
    (dict(output="multitask", seg_kd={"name": "nope"}), "nope"),
    (dict(output="multitask", seg_kd={"weight": -1}), "seg_kd.weight: must be >= 0"),
    (dict(output="multitask", det_kd=[1]), "det_kd: expected a mapping"),
])
def test_adv_kd_bad_options_are_config_errors(kwargs, match):
    from mtkd.losses import build_loss

    with pytest.raises(ConfigError, match=match):
        build_loss("adv_kd", "loss.extra[0]", **kwargs)


def test_only_one_loss_may_craft_adversarial_images():
    with pytest.raises(ConfigError, match="both craft adversarial images"):
        from mtkd.losses.composer import LossComposer

        LossComposer({"extra": [{"name": "pgd_at"}, {"name": "trades"}]}, with_teacher=False)


def test_default_pre_step_returns_the_batch_unchanged():
    from mtkd.losses import build_loss

    batch = {"images": torch.zeros(1, 3, 4, 4), "labels": torch.zeros(1, dtype=torch.long)}
    assert build_loss("ce").pre_step(batch, nn.Identity(), None) is batch
    comp = _composer({"name": "ce"})
    assert comp.pre_step(batch, nn.Identity(), None) is batch and not comp.adv_split


ENTRIES = [{"name": "adv_kd", "preset": p, "steps": 3} for p in sorted(PRESET_TABLE)] + \
          [{"name": "pgd_at", "steps": 3}, {"name": "trades", "steps": 3}]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.get("preset", e["name"]))
def test_adversarial_losses_train_the_student_only(trained, entry):
    net, x, y = trained
    torch.manual_seed(1)
    student = BNNet()
    teacher = TinyNet()
    teacher.load_state_dict(net.state_dict())
    teacher.eval().requires_grad_(False)
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    comp = _composer(entry)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()

    batch = comp.pre_step({"images": x[:16], "labels": y[:16]}, student, teacher)
    # crafting in eval mode: running statistics untouched, train mode restored
    assert student.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in stats.items())
    d = _pixels(batch["adv_images"]) - _pixels(x[:16])
    assert d.abs().max() <= 8 / 255 + 1e-5 and d.abs().max() > 1 / 255
    assert all(p.grad is None for p in student.parameters())

    batch, total, logs, grads = _step(comp, student, teacher, x[:16], y[:16], opt)
    assert torch.isfinite(total) and total > 0
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before_t.items())
    assert all(p.grad is None for p in teacher.parameters())
    label = entry["name"]
    aux = comp.aux_step({}, None, batch)
    assert aux[f"extra/{label}/attack_ms"] > 0
    per_step = 2 if entry.get("preset") == "adaad" else 1
    refs = 1 if entry.get("preset") == "rslad" or label == "trades" else 0
    assert aux[f"extra/{label}/attack_passes"] == 3 * per_step + refs


class _QueryOnly(nn.Module):
    """A teacher that fails when differentiated through: it may only be queried (black box)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        assert not (torch.is_grad_enabled() and x.requires_grad), "the teacher was differentiated through"
        return self.net(x)


@pytest.mark.parametrize("objective", ["ce", "kl"])
def test_black_box_adv_kd_only_queries_the_teacher_and_never_reads_labels(trained, objective):
    net, x, y = trained
    student, teacher = TinyNet(), _QueryOnly(net).eval().requires_grad_(False)
    entry = {"name": "adv_kd", "black_box": True, "source": "student", "objective": objective, "target": "adv",
             "steps": 2, "eps": 0.03, "step_size": 0.02}
    comp = _composer(entry)
    bad = torch.full_like(y[:16], 99)  # would raise in any cross-entropy that read them
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    batch, total, logs, grads = _step(comp, student, teacher, x[:16], bad, opt)
    d = _pixels(batch["adv_images"]) - _pixels(x[:16])
    assert 0 < d.abs().max() <= 0.03 + 1e-5 and torch.isfinite(total) and grads
    assert comp.aux_step({}, None, batch)["extra/adv_kd/attack_passes"] == 2 + 1  # 2 steps + 1 clean query
    # without black_box the same settings read the labels (ce) or differentiate through the teacher (kl)
    with pytest.raises((AssertionError, IndexError, RuntimeError)):
        _step(_composer({**entry, "black_box": False}), student, teacher, x[:16], bad, opt)


def test_mixup_kd_queries_the_teacher_on_mixtures_and_never_reads_labels(trained):
    """Function matching: x_mix mixes pairs of batch images, the black-box teacher is only queried, the
    terms are T^2 KL(S(x_mix)||T(x_mix)) and T^2 KL(S(x)||T(x)), and the student learns."""
    from mtkd.engine.trainer import split_output

    net, x, y = trained
    torch.manual_seed(3)
    student, teacher = TinyNet(), _QueryOnly(net).eval().requires_grad_(False)
    comp = _composer({"name": "mixup_kd", "T": 2.0, "w_mix": 0.7, "w_clean": 0.3})
    assert {"teacher", "adv_split", "adv_teacher"} <= comp.requires
    bad = torch.full_like(y[:16], 99)  # would raise in any cross-entropy that read them
    batch = comp.pre_step({"images": x[:16], "labels": bad}, student, teacher)
    mix, xs = batch["adv_images"], x[:16]
    # every mixed image is lam * x_i + (1 - lam) * x_j for some j and lam in [0, 1]
    for i in range(16):
        fits = []
        for j in range(16):
            d = xs[j] - xs[i]
            if d.abs().max() < 1e-6:
                fits.append((mix[i] - xs[i]).abs().max().item())
                continue
            lam = ((mix[i] - xs[i]) * d).sum() / (d * d).sum()
            fits.append(((mix[i] - xs[i] - lam * d).abs().max().item()) if -1e-4 <= lam <= 1 + 1e-4 else 1.0)
        assert min(fits) < 1e-4, i
    assert (mix - xs).abs().max() > 1e-3  # the images are mixed, not copied
    s_out, s_mix = split_output(student(torch.cat([xs, mix])), 16)
    s_out["adv"] = s_mix
    with torch.no_grad():
        t_out, t_mix = split_output(teacher(torch.cat([xs, mix])), 16)
    t_out["adv"] = t_mix
    total, logs = comp(s_out, t_out, batch)

    def kl(s, t, T):  # T^2 sum_c p_t log(p_t / p_s) at temperature T, mean over images
        p_t = (t / T).softmax(1)
        return T * T * (p_t * (p_t.log() - (s / T).log_softmax(1))).sum(1).mean()

    assert logs["extra/mixup_kd/mix"].item() == pytest.approx(0.7 * kl(s_mix["logits"], t_mix["logits"], 2.0).item(),
                                                              rel=1e-4)
    assert logs["extra/mixup_kd/clean"].item() == pytest.approx(
        0.3 * kl(s_out["logits"], t_out["logits"], 2.0).item(), rel=1e-4)
    before_t = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        _, loss, _, grads = _step(comp, student, teacher, xs, bad, opt)
        losses.append(float(loss.detach()))
        assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before_t.items())


@pytest.mark.parametrize("name,kwargs,match", [
    ("mixup_kd", {"T": 0}, "mixup_kd.T"), ("mixup_kd", {"mix_alpha": -1}, "mixup_kd.mix_alpha"),
    ("mixup_kd", {"w_clean": -0.1}, "w_clean"), ("mixup_ce", {"w_mix": -0.1}, "mixup_ce.w_mix"),
    ("mixup_ce", {"T": 1}, "bad arguments")])
def test_mixup_bad_options_are_config_errors(name, kwargs, match):
    from mtkd.losses import build_loss

    with pytest.raises(ConfigError, match=match):
        build_loss(name, "loss.extra[0]", **kwargs)


def test_mixup_ce_is_lam_weighted_ce_of_both_labels_and_trains_without_teacher(trained):
    from mtkd.engine.trainer import split_output

    net, x, y = trained
    torch.manual_seed(4)
    student = TinyNet()
    comp = _composer({"name": "mixup_ce", "w_mix": 0.5}, with_teacher=False)
    assert "adv_split" in comp.requires and "teacher" not in comp.requires
    batch = comp.pre_step({"images": x[:16], "labels": y[:16]}, student, None)
    perm, lam = batch["mix_perm"], batch["mix_lam"]
    shaped = lam.view(-1, 1, 1, 1)
    assert torch.allclose(batch["adv_images"], shaped * x[:16] + (1 - shaped) * x[:16][perm])
    s_out, s_mix = split_output(student(torch.cat([x[:16], batch["adv_images"]])), 16)
    s_out["adv"] = s_mix
    total, logs = comp(s_out, None, batch)
    lp = s_mix["logits"].log_softmax(1)
    want = -(lam * lp[torch.arange(16), y[:16]] + (1 - lam) * lp[torch.arange(16), y[:16][perm]]).mean()
    assert total.item() == pytest.approx(0.5 * want.item(), rel=1e-5)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = [float(_step(comp, student, None, x[:16], y[:16], opt)[1].detach()) for _ in range(30)]
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses
    with pytest.raises(ConfigError, match="mixup_ce"):
        comp(s_out, None, {**batch, "labels": None})


def test_mixup_kd_beta_mixing_stays_convex_and_needs_the_mixed_half(trained):
    net, x, y = trained
    comp = _composer({"name": "mixup_kd", "mix_alpha": 0.2})
    batch = comp.pre_step({"images": x[:8]}, TinyNet(), net)
    lo, hi = x[:8].min(0).values, x[:8].max(0).values
    assert (batch["adv_images"] >= lo - 1e-6).all() and (batch["adv_images"] <= hi + 1e-6).all()
    with torch.no_grad():
        out = net(x[:8])
    with pytest.raises(ConfigError, match="no mixed half"):
        comp(dict(out), dict(out), batch)


def test_rslad_terms_match_the_formula(trained):
    """5/6 KL(S(x')||T(x)) + 1/6 KL(S(x)||T(x)), the KL with the teacher as the target distribution."""
    from mtkd.engine.trainer import split_output

    net, x, y = trained
    student, teacher = TinyNet(), net
    comp = _composer({"name": "adv_kd", "preset": "rslad", "steps": 2})
    batch = comp.pre_step({"images": x[:8], "labels": y[:8]}, student, teacher)
    s_out, s_adv = split_output(student(torch.cat([x[:8], batch["adv_images"]])), 8)
    s_out["adv"] = s_adv
    with torch.no_grad():
        t = teacher(x[:8])
    _, logs = comp(s_out, t, batch)

    def kl(s, t):  # sum_c p_t log(p_t / p_s), mean over images
        p_t = t.softmax(1)
        return (p_t * (p_t.log() - s.log_softmax(1))).sum(1).mean()

    adv = kl(s_adv["logits"], t["logits"]).item()
    clean = kl(s_out["logits"], t["logits"]).item()
    assert logs["extra/adv_kd/adv"].item() == pytest.approx(5 / 6 * adv, rel=1e-4)
    assert logs["extra/adv_kd/clean"].item() == pytest.approx(1 / 6 * clean, rel=1e-4)
    assert logs["total"].item() == pytest.approx(5 / 6 * adv + 1 / 6 * clean, rel=1e-4)


def test_split_output_matches_separate_forwards(multitask_batch, trained):
    from mtkd.engine.trainer import split_output

    model, batch, _, _ = multitask_batch
    x = batch["images"]
    y = x.flip(-1)
    with torch.no_grad():
        first, second = split_output(model(torch.cat([x, y])), len(x))
        a, b = model(x), model(y)
    for got, want in ((first, a), (second, b)):
        assert torch.allclose(got["seg"], want["seg"], atol=1e-5)
        for k in ("cls", "obj", "box"):
            assert torch.allclose(getattr(got["det"], k), getattr(want["det"], k), atol=1e-5)
        assert torch.equal(got["det"].anchors, want["det"].anchors)
        assert torch.allclose(got["feats"]["p3"], want["feats"]["p3"], atol=1e-5)


def test_multitask_adv_kd_distils_seg_and_det_on_adversarial_inputs(multitask_batch):
    import copy

    from mtkd.engine.trainer import split_output

    model, batch, mean, std = multitask_batch
    student = copy.deepcopy(model).train()
    torch.manual_seed(3)
    teacher = copy.deepcopy(model)
    for p in teacher.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    teacher.eval().requires_grad_(False)
    comp = _composer({"name": "adv_kd", "output": "multitask", "target": "adv", "steps": 2, "w_clean": 0.5})
    comp.bind_input(mean, std)
    b = comp.pre_step(dict(batch), student, teacher)
    d = _pixels(b["adv_images"], mean, std) - _pixels(batch["images"], mean, std)
    assert 4 / 255 < d.abs().max() <= 8 / 255 + 1e-5
    n = len(batch["images"])
    s_out, s_adv = split_output(student(torch.cat([batch["images"], b["adv_images"]])), n)
    s_out["adv"] = s_adv
    with torch.no_grad():
        t_out, t_adv = split_output(teacher(torch.cat([batch["images"], b["adv_images"]])), n)
    t_out["adv"] = t_adv
    total, logs = comp(s_out, t_out, b)
    assert {"extra/adv_kd/adv_seg", "extra/adv_kd/adv_det", "extra/adv_kd/clean_seg"} <= set(logs)
    assert torch.isfinite(total) and logs["extra/adv_kd/adv_seg"] > 0
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # seg_kd / det_kd: the terms' own weights and options; weight 0 drops a term
    for entry, check in (
            ({"det_kd": {"weight": 0}}, lambda lg: "extra/adv_kd/adv_det" not in lg),
            ({"det_kd": {"weight": 3}}, lambda lg: lg["extra/adv_kd/adv_det"].item() == pytest.approx(
                3 * logs["extra/adv_kd/adv_det"].item(), rel=1e-5)),
            ({"det_kd": {"w_obj": 2, "w_cls": 0, "w_box": 0}}, lambda lg: lg["extra/adv_kd/adv_det"].item() != pytest.approx(
                logs["extra/adv_kd/adv_det"].item(), rel=1e-3)),
            ({"seg_kd": {"T": 4.0}}, lambda lg: lg["extra/adv_kd/adv_seg"].item() != pytest.approx(
                logs["extra/adv_kd/adv_seg"].item(), rel=1e-3))):
        c2 = _composer({"name": "adv_kd", "output": "multitask", "target": "adv", "steps": 2, "w_clean": 0.5,
                        **entry})
        _, lg = c2({k: v.detach() if torch.is_tensor(v) else v for k, v in s_out.items()}, t_out, b)
        assert check(lg), entry


def test_classify_train_with_rslad_runs_one_split_student_forward(classify_run):
    """A 2-step classify run with ``extra: [{name: adv_kd, preset: rslad}]``: the student is forwarded once
    per step on 2B images (plus the attack's B-image forwards), and the attack's cost is logged."""
    import csv

    from mtkd.engine.config import build_config
    from mtkd.engine.trainer import Trainer

    tmp, root = classify_run
    cfg = build_config({
        "task": "classify", "out": str(tmp / "rslad"),
        "data": {"format": "imagefolder", "root": str(root), "imgsz": 24, "mean": None, "std": None},
        "model": {"backbone": "cnn4"},
        "teacher": {"ckpt": str(tmp / "run" / "best.pt"), "model": {"name": "cnn4"}},
        "loss": {"det": {}, "seg": {}, "extra": [{"name": "adv_kd", "preset": "rslad"}]},
        "train": {"epochs": 1, "max_steps": 2, "batch": 8, "workers": 0, "ema": False, "tensorboard": False,
                  "plots": False, "device": "cpu"},
    })
    tr = Trainer(cfg)
    sizes = []  # batch size of every student forward after build (training steps, then evaluation)
    build = tr.build

    def build_and_hook():
        build()
        tr.model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))

    tr.build = build_and_hook
    report = tr.fit()
    assert report["steps"] == 2 and 0 <= report["top1"] <= 100
    # per step: the attack's 10 forwards on the 8 images, then ONE forward on the 16 clean + adversarial ones
    assert sizes[:22] == ([8] * 10 + [16]) * 2
    assert 16 not in sizes[22:]
    rows = list(csv.DictReader(open(tmp / "rslad" / "results.csv")))
    assert float(rows[-1]["train/extra/adv_kd/attack_ms"]) > 0
    assert float(rows[-1]["train/extra/adv_kd/attack_passes"]) == 11.0  # 10 steps x student + 1 teacher reference
    assert float(rows[-1]["train/extra/adv_kd/adv"]) > 0


def _train_multitask_one_step(tmp_path, extra, teacher=True):
    """Train ``student_small`` one step on a tiny synthetic VOC set with ``loss.extra=extra`` (with a random
    ``student_small`` teacher unless ``teacher`` is false); the last row of its ``results.csv``."""
    import csv
    import sys
    from pathlib import Path

    from mtkd.datasets import SYNTHETIC_CLASSES, make_synthetic
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import random_checkpoint

    roots = make_synthetic(tmp_path / "d", n_train=4, n_val=2, n_test=2, imgsz=(48, 64), seed=3, seg_missing=0.25,
                           formats=("voc",))
    over = [f"data.root={roots['voc']}", "data.imgsz=64", f"out={tmp_path / 'run'}", "model.preset=student_small",
            "train.batch=4", "train.workers=0", "train.ema=false", "train.plots=false", "train.tensorboard=false",
            "train.epochs=1", "eval.max_batches=1", f"loss.extra={extra}"]
    if teacher:
        ckpt = random_checkpoint(tmp_path / "teacher.pt", {"preset": "student_small"}, SYNTHETIC_CLASSES, seed=1)
        over.append(f"teacher.ckpt={ckpt}")
    report = train(load_config("synthetic_kd.yaml" if teacher else "synthetic_student.yaml", over))
    assert report["steps"] == 1
    return list(csv.DictReader(open(tmp_path / "run" / "results.csv")))[-1]


def test_multitask_train_with_adv_kd_splits_student_and_teacher(tmp_path):
    """Multi-task KD with adv_kd (output multitask, teacher at x'): the trainer's split forward of
    both models (DetOutput included) feeds seg_kl + det_mse on the adversarial half."""
    row = _train_multitask_one_step(tmp_path, "[{name: adv_kd, output: multitask, target: adv, steps: 2, T: 2}]")
    assert float(row["train/extra/adv_kd/adv_seg"]) > 0 and "train/extra/adv_kd/adv_det" in row
    assert float(row["train/extra/adv_kd/attack_passes"]) == 4.0  # 2 steps + 2 clean references


def test_multitask_mixup_kd_counts_every_pixel_of_a_mixture():
    """On the mixed half the masks are left out: a batch whose masks are all VOID still gives a seg term
    on the mixtures (a mixture has no void), while the clean term sees no valid pixel."""
    from mtkd.losses import build_loss
    from mtkd.structures import VOID

    torch.manual_seed(0)
    loss = build_loss("mixup_kd", "loss.extra[0]", output="multitask", T=2.0, w_mix=1.0, w_clean=1.0,
                      det_kd={"weight": 0})
    s, t = {"seg": torch.randn(2, 3, 8, 8, requires_grad=True)}, {"seg": torch.randn(2, 3, 8, 8)}
    s["adv"], t["adv"] = {"seg": torch.randn(2, 3, 8, 8, requires_grad=True)}, {"seg": torch.randn(2, 3, 8, 8)}
    batch = {"images": torch.zeros(2, 3, 8, 8), "masks": torch.full((2, 8, 8), VOID, dtype=torch.long),
             "has_seg": torch.tensor([True, True])}
    terms = loss(s, t, batch)
    want = build_loss("seg_kl", "x", T=2.0)(s["adv"], t["adv"], {"images": batch["images"]})
    assert terms["mix"].item() == pytest.approx(want.item(), rel=1e-6) and want.item() > 0
    assert terms["clean"].item() == 0.0
    with pytest.raises(ConfigError, match="only with output multitask"):
        build_loss("mixup_kd", "loss.extra[0]", seg_kd={"T": 1})
    with pytest.raises(ConfigError, match=r"mixup_kd\.det_kd\.weight: must be >= 0"):
        build_loss("mixup_kd", "loss.extra[0]", output="multitask", det_kd={"weight": -1})


def test_multitask_train_with_mixup_kd_splits_student_and_teacher(tmp_path):
    """Multi-task function matching: the trainer's split forward of both models feeds seg_kl + det_mse on
    the mixed half; the labelled clean half keeps the hard losses."""
    row = _train_multitask_one_step(tmp_path, "[{name: mixup_kd, output: multitask, w_clean: 0, T: 2}]")
    assert float(row["train/extra/mixup_kd/mix"]) > 0 and "train/extra/mixup_kd/clean" not in row


# -- transfer from a surrogate -------------------------------------------------------------------
def test_flip_rates_surrogate_equal_to_target_transfers_like_white_box(trained):
    from torch.utils.data import DataLoader

    from mtkd.adversarial.report import flip_rates
    from mtkd.tasks.classify.data import collate

    net, x, y = trained
    items = [{"image": x[i], "label": int(y[i]), "index": i, "id": str(i)} for i in range(len(y))]
    loader = DataLoader(items, batch_size=32, collate_fn=collate)
    spec = make_attack("pgd", 8 / 255, steps=5)
    same = flip_rates(net, net, loader, spec, MEAN, STD, torch.device("cpu"), seed=0)
    assert same["transfer_success"] == same["surrogate_whitebox_success"] > 0.3
    assert same["noise_success"] < same["transfer_success"]
    assert same["n_images"] == len(y) and same["n_target_correct"] == same["n_surrogate_correct"]
    torch.manual_seed(5)
    other = flip_rates(net, TinyNet().eval(), loader, spec, MEAN, STD, torch.device("cpu"), seed=0)
    assert other["transfer_success"] < same["transfer_success"]  # a random surrogate transfers worse


def test_mtkd_attack_with_surrogate_reports_transfer(classify_run):
    import json

    from mtkd.cli import main

    tmp, _ = classify_run
    out = tmp / "transfer"
    code = main(["attack", str(tmp / "run" / "config.yaml"), "--ckpt", str(tmp / "run" / "best.pt"), "--eps", "8/255",
                 "--steps", "3", "--no-checks", "--draw", "0", "--out", str(out),
                 "--surrogate", str(tmp / "run" / "best.pt")])
    assert code == 0
    report = json.loads((out / "attack.json").read_text())
    (row,) = report["transfer"]
    for key in ("transfer_success", "surrogate_whitebox_success", "noise_success", "target_transfer",
                "target_noise", "surrogate_whitebox", "n_target_correct"):
        assert key in row
    # the surrogate here is the target itself: the transferred attack is the white-box one
    assert row["surrogate_clean"]["top1"] == pytest.approx(report["clean"]["top1"])
    assert row["transfer_success"] == row["surrogate_whitebox_success"]
    assert row["target_transfer"]["top1"] == pytest.approx(row["surrogate_whitebox"]["top1"])


def test_multitask_train_with_pgd_at_trains_on_hard_losses_of_adversarial_inputs(tmp_path):
    """pgd_at with output multitask: x' crafted on the student's seg CE + yolo_det, the hard losses on x'
    logged beside the clean ones; a bad output is a one-line error."""
    from mtkd.losses.base import build_loss

    row = _train_multitask_one_step(tmp_path, "[{name: pgd_at, output: multitask, eps: 4/255, steps: 2, w_seg: 8.0}]",
                                    teacher=False)
    assert float(row["train/extra/pgd_at/det"]) > 0 and float(row["train/extra/pgd_at/seg"]) > 0
    assert float(row["train/extra/pgd_at/attack_passes"]) == 3.0  # 2 steps + 1 clean reference (targets)
    with pytest.raises(ConfigError, match="pgd_at.output"):
        build_loss("pgd_at", output="seg")
    with pytest.raises(ConfigError, match="w_det/w_seg"):
        build_loss("pgd_at", output="multitask", w_det=0, w_seg=0)

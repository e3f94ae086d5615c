"""The ``classify`` task through the generic trainer: a tiny distillation run and predict."""
import json

import pytest

import mtkd.tasks.classify.task  # noqa: F401  (registers the "classify" task)
from mtkd.engine.config import build_config
from mtkd.engine.trainer import predict_checkpoint, train
from mtkd.tasks.classify import make_synthetic_imagefolder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clsrun")
    root = make_synthetic_imagefolder(tmp / "data", n_classes=3, n_per_class=4, imgsz=24, seed=1)
    cfg = build_config({
        "task": "classify", "out": str(tmp / "run"),
        "data": {"format": "imagefolder", "root": str(root), "imgsz": 24, "mean": None, "std": None},
        "teacher": {"model": {"name": "cnn4", "widths": [8, 16, 16, 32], "hidden": 16}},
        "loss": {"extra": [{"name": "ce", "weight": 0.3}, {"name": "st", "weight": 0.7, "T": 4.0},
                           {"name": "fitnet", "weight": 0.1, "feats": ["f3", "f4"]},
                           {"name": "ft", "feats": ["f4"], "para_steps": 1}]},
        "train": {"epochs": 1, "batch": 6, "workers": 0, "ema": False, "tensorboard": False, "plots": True,
                  "device": "cpu"},
    })
    report = train(cfg)
    return tmp, root, cfg, report


def test_distillation_run_reports_top1_and_logs_terms(run):
    tmp, _, cfg, report = run
    out = tmp / "run"
    assert report["split"] == "test" and 0.0 <= report["top1"] <= 100.0 and report["steps"] == 2
    saved = json.loads((out / "test_metrics.json").read_text())
    assert saved["top1"] == report["top1"]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    for col in ("train/extra/ce", "train/extra/st", "train/extra/fitnet", "train/extra/ft",
                "train/extra/ft/para_loss", "val/top1"):
        assert col in header
    assert (out / "val_pred.png").is_file()
    assert "mean: null" not in (out / "config.yaml").read_text()  # computed stats recorded for predict


def test_predict_checkpoint_writes_lines(run):
    tmp, root, cfg, _ = run
    from mtkd.engine.config import load_config

    saved = load_config(tmp / "run" / "config.yaml")
    lines = predict_checkpoint(saved, tmp / "run" / "best.pt", root / "val", tmp / "pred")
    assert len(lines) == 3
    assert (tmp / "pred" / "predictions.txt").read_text().splitlines() == lines
    assert all(len(line.split(" ")) == 3 for line in lines)


def test_robust_validation_scores_attacked_top1_and_chooses_best_on_it(tmp_path):
    """``eval.attack`` adds ``robust_top1`` to val and test; ``train.save_best_on: robust_top1`` picks on it."""
    root = make_synthetic_imagefolder(tmp_path / "data", n_classes=3, n_per_class=6, imgsz=16, seed=2)
    cfg = build_config({
        "task": "classify", "out": str(tmp_path / "run"),
        "data": {"format": "imagefolder", "root": str(root), "imgsz": 16, "mean": None, "std": None},
        "model": {"preset": "student"},
        "loss": {"extra": [{"name": "ce"}]},
        "eval": {"attack": {"name": "pgd", "eps": "8/255", "steps": 3}},
        "train": {"epochs": 2, "batch": 6, "workers": 0, "ema": False, "tensorboard": False, "plots": False,
                  "device": "cpu", "save_best_on": "robust_top1"},
    })
    report = train(cfg)
    assert 0.0 <= report["robust_top1"] <= report["top1"]
    rows = (tmp_path / "run" / "results.csv").read_text().splitlines()
    header = rows[0].split(",")
    robust = [float(r.split(",")[header.index("val/robust_top1")]) for r in rows[1:]]
    assert len(robust) == 2
    import torch

    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["metrics"]["robust_top1"] == max(robust)


def test_eval_attack_is_checked_before_training_and_only_for_classifiers(tmp_path):
    from mtkd.errors import ConfigError
    from mtkd.tasks.classify.evaluation import eval_attack

    assert eval_attack({"attack": None}) is None
    spec = eval_attack({"attack": {"eps": "4/255", "steps": 5}})
    assert (spec.name, spec.steps) == ("pgd", 5) and abs(spec.eps - 4 / 255) < 1e-12
    with pytest.raises(ConfigError, match="eval.attack: unknown key"):
        eval_attack({"attack": {"eps": 0.1, "stepz": 3}})
    with pytest.raises(ConfigError, match="eval.attack.eps"):
        eval_attack({"attack": {"eps": 0}})
    root = make_synthetic_imagefolder(tmp_path / "data", n_classes=3, n_per_class=2, imgsz=16, seed=3)
    cfg = build_config({"task": "classify", "out": str(tmp_path / "run"),
                        "data": {"format": "imagefolder", "root": str(root), "imgsz": 16},
                        "model": {"preset": "student"}, "loss": {"extra": [{"name": "ce"}]},
                        "eval": {"attack": {"eps": -1}}, "train": {"workers": 0, "device": "cpu"}})
    with pytest.raises(ConfigError, match="eval.attack.eps"):
        train(cfg)
    assert not (tmp_path / "run" / "results.csv").exists()


def test_robust_top1_falls_under_a_real_attack_and_equals_top1_under_a_null_one(tmp_path):
    import torch

    from mtkd.adversarial.attacks import make_attack
    from mtkd.tasks.classify.evaluation import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x):
            return {"logits": self.net(x)}

    images = torch.rand(12, 3, 4, 4)
    with torch.no_grad():
        labels = Wrap()(images)["logits"].argmax(1)  # the model is right on every image
    loader = [{"images": images, "labels": labels}]
    ds = type("D", (), {"classes": ["a", "b", "c"]})()
    null = make_attack("pgd", 0.1, steps=0, random_start=False)
    strong = make_attack("pgd", 0.5, steps=10)
    m0 = evaluate(Wrap(), loader, ds, torch.device("cpu"), attack=null, mean=[0, 0, 0], std=[1, 1, 1])
    assert m0["top1"] == m0["robust_top1"] == 100.0
    m1 = evaluate(Wrap(), loader, ds, torch.device("cpu"), attack=strong, mean=[0, 0, 0], std=[1, 1, 1])
    m2 = evaluate(Wrap(), loader, ds, torch.device("cpu"), attack=strong, mean=[0, 0, 0], std=[1, 1, 1])
    assert m1["top1"] == 100.0 and m1["robust_top1"] < 50.0
    assert m1["robust_top1"] == m2["robust_top1"]  # seeded random start: repeatable

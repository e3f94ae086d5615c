"""`mtkd classify make-data|predict` and the mtkd/configs/classify YAMLs (tiny data, one short training run)."""
from pathlib import Path

import pytest
import torch

import mtkd.tasks.classify.cli  # noqa: F401  (registers the `classify` subcommand)
from mtkd.cli import main
from mtkd.engine.config import load_config
from mtkd.engine.trainer import train
from mtkd.losses.composer import LossComposer

CFG = Path(__file__).resolve().parents[1] / "mtkd" / "configs" / "classify"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clscli")
    data = tmp / "data"
    assert main(["classify", "make-data", "--out", str(data), "--classes", "3", "--per-class", "4",
                 "--test-per-class", "2", "--imgsz", "16", "--seed", "3"]) == 0
    overrides = [f"data.root={data}", "data.imgsz=16", f"out={tmp / 'run'}", "train.epochs=1", "train.batch=6",
                 "train.plots=false", "train.tensorboard=false", "train.device=cpu"]
    cfg = load_config(CFG / "student_plain.yaml", overrides)
    report = train(cfg)
    return tmp, data, overrides, report


def test_make_data_writes_three_splits_and_labels(trained):
    _, data, _, _ = trained
    counts = {s: {c.name: len(list(c.glob("*.png"))) for c in (data / s).iterdir()} for s in ("train", "val", "test")}
    assert counts["train"] == {"class00": 4, "class01": 4, "class02": 4}
    assert counts["val"] == {"class00": 1, "class01": 1, "class02": 1}
    assert counts["test"] == {"class00": 2, "class01": 2, "class02": 2}
    assert (data / "labels.txt").read_text().splitlines() == ["0 class00", "1 class01", "2 class02"]
    # the test split is a separate draw, not a copy of training images
    train_bytes = {p.read_bytes() for p in (data / "train").rglob("*.png")}
    assert not any(p.read_bytes() in train_bytes for p in (data / "test").rglob("*.png"))


def test_plain_config_trains_the_cnn_student_on_top1(trained):
    _, _, _, report = trained
    assert report["save_best_on"] == "top1" and 0.0 <= report["top1"] <= 100.0
    assert report["params"] < 1e6  # the 4-block CNN, not the ResNet teacher


def test_predict_prints_file_class_prob_with_checkpoint_stats(trained, capsys):
    tmp, data, overrides, _ = trained
    capsys.readouterr()
    # student_plain.yaml has data.mean/std null: they come from the checkpoint
    assert main(["classify", "predict", str(CFG / "student_plain.yaml"), *overrides[:2],
                 "--ckpt", str(tmp / "run" / "best.pt"), "--source", str(data / "test")]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted(p.relative_to(data / "test").as_posix() for p in (data / "test").rglob("*.png"))
    assert sorted(line.split(" ")[0] for line in lines) == files
    for line in lines:
        _, cls, prob = line.split(" ")
        assert cls in {"class00", "class01", "class02"} and 0.0 < float(prob) <= 1.0


def test_predict_uses_labels_file_names_and_rejects_a_wrong_count(trained, capsys):
    tmp, data, overrides, _ = trained
    labels = tmp / "names.txt"
    labels.write_text("0 stripes\n1 waves\n2 dots\n")
    capsys.readouterr()
    args = ["classify", "predict", str(CFG / "student_plain.yaml"), *overrides[:2],
            "--ckpt", str(tmp / "run" / "best.pt"), "--source", str(data / "test")]
    assert main(args + ["--labels", str(labels)]) == 0
    assert {line.split(" ")[1] for line in capsys.readouterr().out.splitlines()} <= {"stripes", "waves", "dots"}
    labels.write_text("0 stripes\n1 waves\n")
    assert main(args + ["--labels", str(labels)]) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert main(args[:-1] + [str(tmp / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_student_st_is_one_minus_alpha_ce_plus_alpha_soft_targets():
    cfg = load_config(CFG / "student_st.yaml")
    assert cfg["teacher"]["model"]["name"] == load_config(CFG / "teacher.yaml")["model"]["backbone"]
    extra = {e["name"]: e for e in cfg["loss"]["extra"]}
    alpha, T = extra["st"]["weight"], extra["st"]["T"]
    assert extra["ce"]["weight"] == pytest.approx(1.0 - alpha)
    composer = LossComposer(cfg["loss"], with_teacher=True)
    torch.manual_seed(0)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    total, _ = composer({"logits": s}, {"logits": t}, {"labels": labels})
    ce = torch.nn.functional.cross_entropy(s, labels)
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.softmax(t / T, 1),
                                    reduction="batchmean") * T * T
    assert float(total) == pytest.approx(float((1 - alpha) * ce + alpha * kl), rel=1e-5)


def test_predict_one_file_and_skip_bad(trained, capsys, tmp_path):
    import shutil

    tmp, data, overrides, _ = trained
    src = tmp_path / "src"
    shutil.copytree(data / "test", src)
    one = sorted(src.rglob("*.png"))[0]
    head = ["classify", "predict", str(CFG / "student_plain.yaml"), *overrides[:2]]
    args = head + ["--ckpt", str(tmp / "run" / "best.pt")]
    capsys.readouterr()
    assert main(args + ["--source", str(one)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].split(" ")[0] == one.name
    broken = src / "class00" / "broken.png"
    broken.write_bytes(b"not a png")
    assert main(args + ["--source", str(src)]) == 2
    assert f"{broken}: not a readable image" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="broken.png"):
        assert main(head + ["data.skip_bad=true", "--ckpt", str(tmp / "run" / "best.pt"), "--source", str(src)]) == 0
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png") if p != broken)
    assert sorted(line.split(" ")[0] for line in capsys.readouterr().out.splitlines()) == files

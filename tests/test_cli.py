"""The `mtkd` command line: one-line errors with exit code 2, eval table and JSON."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import test_engine  # noqa: F401  (registers the "toy" task and "toy_seg" loss)
from mtkd.cli import COMMANDS, command, main

ROOT = Path(__file__).resolve().parents[1]


def test_missing_config_prints_one_line_error_exit_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    proc = subprocess.run([sys.executable, "-m", "mtkd.cli", "train", str(missing)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.yaml" in lines[0]
    assert "Traceback" not in proc.stderr


def test_bad_override_error_in_process(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\n")
    assert main(["train", str(cfg), "train.epohcs=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: train.epohcs: unknown config key; did you mean 'train.epochs'?"


def test_eval_prints_table_and_writes_json(tmp_path, capsys):
    run = tmp_path / "run"
    user = {"task": "toy", "out": str(run), "loss": {"seg": {"hard": {"name": "toy_seg"}}},
            "train": {"epochs": 1, "batch": 8, "workers": 0, "device": "cpu", "tensorboard": False,
                      "plots": False}}
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(user))
    assert main(["train", str(cfg_path)]) == 0
    capsys.readouterr()
    out_json = tmp_path / "m" / "metrics.json"
    assert main(["eval", str(cfg_path), "--ckpt", str(run / "best.pt"), "--split", "val",
                 "--json", str(out_json)]) == 0
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split() == ["params", "gflops", "latency_ms"]
    metrics = json.loads(out_json.read_text())
    assert metrics["split"] == "val" and row.split()[0] == f"{metrics['params']:,}"
    # a corrupt checkpoint is a one-line error naming it
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    assert main(["eval", str(cfg_path), "--ckpt", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "bad.pt" in err and "\n" not in err


def test_resume_flag_continues_training(tmp_path, capsys):
    run = tmp_path / "run"
    user = {"task": "toy", "out": str(run), "loss": {"seg": {"hard": {"name": "toy_seg"}}},
            "train": {"epochs": 1, "batch": 8, "workers": 0, "device": "cpu", "tensorboard": False,
                      "plots": False}}
    cfg_path = tmp_path / "toy.yaml"
    cfg_path.write_text(yaml.safe_dump(user))
    assert main(["train", str(cfg_path)]) == 0
    assert main(["train", str(cfg_path), "train.epochs=2", "--resume"]) == 0
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 6


def test_subcommand_table_is_extensible(capsys):
    assert {"train", "eval", "predict", "make-synthetic", "list"} <= set(COMMANDS.names())

    @command("hello-test", help="a subcommand added from outside")
    def _setup(p):
        p.add_argument("--name", default="x")
        return lambda args: print(f"hello {args.name}") or 0

    try:
        assert main(["hello-test", "--name", "mtkd"]) == 0
        assert capsys.readouterr().out.strip() == "hello mtkd"
    finally:
        COMMANDS.unregister("hello-test")


def test_make_synthetic_writes_only_the_formats_asked(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["make-synthetic", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "1",
                 "--formats", "voc"]) == 0
    assert (out / "voc" / "classes.txt").is_file()
    assert not (out / "coco").exists() and not (out / "yolo").exists()

"""`import mtkd` sets nothing; `go_offline()` / `mtkd --offline` / `mtkd demo` set the offline switches."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtkd import env as mtkd_env
from mtkd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = (*mtkd_env.OFFLINE_ENV, "YOLO_CONFIG_DIR", "YOLO_VERBOSE")


def test_import_sets_no_environment_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    env.update(HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    # parsing the command line must not import Ultralytics / albumentations: `--offline` is applied
    # after parsing, and both read the switches when imported
    code = ("import json, os, sys, mtkd, mtkd.cli, mtkd.env; mtkd.cli.build_parser(); "
            "assert not {'ultralytics', 'albumentations'} & set(sys.modules), 'imported while parsing'; "
            f"print(json.dumps({{k: os.environ.get(k) for k in {list(SWITCHES)!r}}}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {k: None for k in SWITCHES}
    assert not (tmp_path / ".config").exists()  # no font copied either


def test_go_offline_sets_only_what_is_unset(tmp_path, monkeypatch):
    for key in SWITCHES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("YOLO_OFFLINE", "0")  # the user's own value wins
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "yolo"))
    assert mtkd_env.go_offline() == tmp_path / "yolo"
    assert os.environ["YOLO_OFFLINE"] == "0"
    for key in ("YOLO_AUTOINSTALL", "NO_ALBUMENTATIONS_UPDATE", "HF_HUB_OFFLINE"):
        assert os.environ[key] == mtkd_env.OFFLINE_ENV[key]
    assert "YOLO_VERBOSE" not in os.environ  # Ultralytics' logging is the user's business
    assert (tmp_path / "yolo" / "Ultralytics" / "Arial.ttf").stat().st_size > 0
    monkeypatch.delenv("YOLO_CONFIG_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert mtkd_env.go_offline() == tmp_path / "home" / ".config" / "mtkd-yolo"
    assert os.environ["YOLO_CONFIG_DIR"] == str(tmp_path / "home" / ".config" / "mtkd-yolo")


@pytest.mark.parametrize("flag_first", [True, False])
def test_cli_offline_flag_calls_go_offline(tmp_path, monkeypatch, flag_first, capsys):
    calls = []
    monkeypatch.setattr(mtkd_env, "go_offline", lambda: calls.append(1))
    cmd = ["make-synthetic", "--out", str(tmp_path / "d"), "--n-train", "1", "--n-val", "1", "--n-test", "0",
           "--formats", "voc"]
    assert main(cmd) == 0 and calls == []
    assert main(["--offline", *cmd] if flag_first else [*cmd, "--offline"]) == 0 and calls == [1]


def test_demo_goes_offline_itself(tmp_path, monkeypatch):
    class Called(Exception):
        pass

    def record():
        raise Called

    monkeypatch.setattr(mtkd_env, "go_offline", record)
    with pytest.raises(Called):  # before it writes or trains anything
        main(["demo", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")])
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()

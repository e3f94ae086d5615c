"""Config loading: defaults, `_base_` chains, overrides, validation errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtkd.engine.config import (DEFAULTS_PATH, FREE_FORM, build_config, load_config, packaged_configs,
                                parse_overrides, resolve_config)
from mtkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_nested_key_names_dotted_key_and_suggests(tmp_path):
    cfg = write(tmp_path / "c.yaml", {"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown config key; did you mean 'train\.lr'\?"):
        load_config(cfg)
    with pytest.raises(ConfigError, match=r"eval\.max_dett"):
        build_config({"eval": {"max_dett": 5}})
    with pytest.raises(ConfigError, match=r"^modle: unknown config key; did you mean 'model'\?$"):
        build_config({"modle": {}})


def test_type_mismatch_names_key():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected int, got str"):
        build_config({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.amp: expected bool"):
        build_config({"train": {"amp": 1}})
    with pytest.raises(ConfigError, match=r"data\.mean: expected list"):
        build_config({"data": {"mean": 0.5}})
    # an int where the default is a float is fine; null defaults take anything
    cfg = build_config({"train": {"lr": 1, "max_steps": 100}, "data": {"classes": ["a", "b"]}})
    assert cfg["train"]["lr"] == 1 and cfg["train"]["max_steps"] == 100 and cfg["data"]["classes"] == ["a", "b"]


def test_base_chain_and_overrides(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", {"seed": 3, "train": {"epochs": 7, "batch": 4}, "data": {"imgsz": 96}})
    write(tmp_path / "sub" / "mid.yaml", {"_base_": "../base.yaml", "train": {"batch": 2}})
    run = write(tmp_path / "sub" / "run.yaml", {"_base_": "mid.yaml", "out": "runs/x"})
    cfg = load_config(run, ["train.lr=0.05", "data.classes=[cat, dog]", "teacher.ckpt=t.pt", "train.amp=true"])
    assert cfg["seed"] == 3 and cfg["train"]["epochs"] == 7 and cfg["train"]["batch"] == 2
    assert cfg["data"]["imgsz"] == 96 and cfg["out"] == "runs/x"
    assert cfg["train"]["lr"] == 0.05 and cfg["data"]["classes"] == ["cat", "dog"]
    assert cfg["teacher"]["ckpt"] == "t.pt" and cfg["train"]["amp"] is True
    # untouched keys keep their defaults
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    assert cfg["train"]["optimizer"] == defaults["train"]["optimizer"]
    with pytest.raises(ConfigError, match=r"train\.bacth"):
        load_config(run, ["train.bacth=3"])


def test_scientific_notation_is_a_float_in_overrides_and_files(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  weight_decay: 5e-4\n")
    run = tmp_path / "run.yaml"
    run.write_text("_base_: base.yaml\ntrain:\n  lr: 1e-3\n  lrf: 1E-2\n"
                   "loss:\n  extra: [{name: cwd, weight: 2e-1}]\n")
    cfg = load_config(run)
    assert (cfg["train"]["lr"], cfg["train"]["lrf"], cfg["train"]["weight_decay"]) == (1e-3, 1e-2, 5e-4)
    assert type(cfg["train"]["lr"]) is float and cfg["loss"]["extra"][0]["weight"] == 0.2
    cfg = load_config(run, ["train.lr=1E-4", "train.momentum=+9e-1", "train.ema_tau=2e3", "train.epochs=3"])
    assert (cfg["train"]["lr"], cfg["train"]["momentum"], cfg["train"]["ema_tau"]) == (1e-4, 0.9, 2000.0)
    assert type(cfg["train"]["epochs"]) is int
    # what is not a number stays a string, and a float key refuses it
    assert parse_overrides(["out=runs/1e-3x", "data.classes=[a1e3]"]) == {"out": "runs/1e-3x",
                                                                          "data": {"classes": ["a1e3"]}}
    with pytest.raises(ConfigError, match=r"^train\.lr: expected float, got str \('1e-3x'\)$"):
        load_config(run, ["train.lr=1e-3x"])
    assert parse_overrides(["train.lr=1e-3"]) == {"train": {"lr": 0.001}}  # the module doc's example


def test_base_cycle_and_bad_yaml(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml"})
    with pytest.raises(ConfigError, match="_base_ cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        parse_overrides(["train.lr"])


def test_free_form_subtree_replaces_default_and_is_not_validated():
    assert "loss" in FREE_FORM
    cfg = build_config({"loss": {"seg": {"hard": {"name": "seg_ce", "anything": 1}}}})
    assert cfg["loss"] == {"seg": {"hard": {"name": "seg_ce", "anything": 1}}}  # no default det loss merged in
    cfg = build_config({}, ["loss.det.alpha=0.5"])  # overrides still merge inside the given tree
    assert cfg["loss"] == {"det": {"alpha": 0.5}}
    assert build_config({})["loss"]["det"]["hard"]["name"] == "yolo_det"
    with pytest.raises(ConfigError, match="data.augment: expected dict"):
        build_config({"data": {"augment": [1]}})


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "mtkd" / "configs").glob("*.yaml")))
def test_shipped_configs_load_and_stay_short(name):
    path = ROOT / "mtkd" / "configs" / name
    cfg = load_config(path)
    assert cfg["task"] == "multitask"
    if name != "defaults.yaml":
        assert len(path.read_text().splitlines()) <= 60


def test_configs_are_packaged_and_found_by_name(tmp_path, monkeypatch):
    assert packaged_configs() == ROOT / "mtkd" / "configs" and DEFAULTS_PATH.parent == packaged_configs()
    monkeypatch.chdir(tmp_path)  # no configs/ here: the packaged ones are used
    packaged = packaged_configs() / "synthetic_kd.yaml"
    assert resolve_config("synthetic_kd.yaml") == packaged
    assert resolve_config("configs/synthetic_kd.yaml") == packaged  # the old repository spelling
    assert resolve_config("classify/student_st.yaml") == packaged_configs() / "classify" / "student_st.yaml"
    assert load_config("configs/synthetic_kd.yaml") == load_config(packaged)
    assert load_config("classify/student_st.yaml")["task"] == "classify"  # _base_ chain inside the package
    with pytest.raises(ConfigError, match=r"^nope\.yaml: config file not found \(neither a file nor a packaged"):
        load_config("nope.yaml")


def test_an_existing_file_wins_over_a_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "synthetic_kd.yaml", {"seed": 7})
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs" / "synthetic_student.yaml", {"seed": 8})
    assert resolve_config("synthetic_kd.yaml") == Path("synthetic_kd.yaml")
    assert load_config("synthetic_kd.yaml")["seed"] == 7
    assert load_config("configs/synthetic_student.yaml")["seed"] == 8
    assert load_config("synthetic_student.yaml")["model"] == load_config(
        packaged_configs() / "synthetic_student.yaml")["model"]


def test_every_packaged_yaml_is_package_data():
    """Each YAML under mtkd/configs matches a pyproject package-data pattern (so a wheel carries it)."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mtkd"]
    root = ROOT / "mtkd"
    files = set((root / "configs").rglob("*.yaml"))
    covered = {f for pat in patterns for f in root.glob(pat)}
    assert len(files) >= 10 and files <= covered, sorted(str(f) for f in files - covered)

"""benchmarks/adversarial and benchmarks/transfer: roles, verdicts, and one --quick run of each part."""
from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

import mtkd  # noqa: F401  (offline switches first)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
adv = importlib.import_module("benchmarks.adversarial.run")
transfer = importlib.import_module("benchmarks.transfer.run")

RECORD_KEYS = ("role", "seed", "epochs", "steps", "wall_s", "params", "gflops")


def _rec(role: str, seed: int, clean: float, robust: float) -> dict:
    return {"role": role, "seed": seed, "clean": clean, "robust": robust}


# -- roles and verdicts -------------------------------------------------------------------------
def test_role_losses_and_teachers() -> None:
    atk = adv.attack_options(8 / 255, 3)
    assert atk["step_size"] == pytest.approx(2.5 * 8 / 255 / 3)
    assert adv.role_loss("plain", atk) == ([{"name": "ce"}], None)
    assert adv.role_loss("teacher_at", atk) == ([{"name": "trades", "beta": 6.0, **atk}], None)
    assert adv.role_loss("teacher_at", atk, "pgd_at") == ([{"name": "pgd_at", **atk}], None)
    assert adv.role_loss("rslad", atk) == ([{"name": "adv_kd", "preset": "rslad", **atk}], "teacher_at")
    assert adv.role_loss("ard_nat", atk) == ([{"name": "adv_kd", "preset": "ard", **atk}], "teacher_nat")
    assert adv.role_loss("kd", atk)[1] == "teacher_at"
    # every role builds: its losses exist and accept the options
    from mtkd.losses.base import build_loss

    for role in adv.ROLES + adv.TEACHERS:
        for entry in adv.role_loss(role, atk)[0]:
            opts = {k: v for k, v in entry.items() if k not in ("name", "weight")}
            build_loss(entry["name"], role, **opts)


def test_select_robust_chooses_the_checkpoints_of_attack_trained_runs_on_robust_val_top1() -> None:
    atk = adv.attack_options(4 / 255, 3)
    for role in ("pgd_at", "trades", "rslad", "ard_nat", "teacher_at"):
        ov = adv.select_overrides(adv.role_loss(role, atk)[0], 4 / 255, "robust")
        assert "train.save_best_on=robust_top1" in ov, role
        (attack,) = [o for o in ov if o.startswith("eval.attack=")]
        assert json.loads(attack.split("=", 1)[1]) == {"name": "pgd", "eps": 4 / 255, "steps": adv.SELECT_STEPS}
    for role in ("plain", "kd", "teacher_nat"):
        assert adv.select_overrides(adv.role_loss(role, atk)[0], 4 / 255, "robust") == [], role
    assert adv.select_overrides(adv.role_loss("pgd_at", atk)[0], 4 / 255, "clean") == []


def test_classify_target_needs_the_best_presets_worst_seed_above_pgd_at_best_seed() -> None:
    runs = [_rec("pgd_at", s, 80.0, r) for s, r in enumerate((30.0, 32.0, 31.0))]
    runs += [_rec("rslad", s, 79.0, r) for s, r in enumerate((33.0, 35.0, 34.0))]
    runs += [_rec("ard", s, 85.0, r) for s, r in enumerate((20.0, 40.0, 25.0))]   # median 25: not the best
    runs += [_rec("rslad_nat", s, 81.0, 29.0) for s in range(3)]
    lines, summary = adv.classify_verdicts(runs)
    t = summary["target"]
    assert t["best_preset"] == "rslad" and t["worst_seed_robust"] == 33.0 and t["pgd_at_best_seed_robust"] == 32.0
    assert t["clean_vs_pgd_at"] == pytest.approx(-1.0) and t["met"] is True
    assert any(line.startswith("rslad: median robust with the AT teacher 34.0, with the natural teacher 29.0")
               for line in lines)
    # clean more than 2 points below PGD-AT's fails the target, and so does a worst seed at PGD-AT's best
    low = [dict(r, clean=77.5) if r["role"] == "rslad" else r for r in runs]
    assert adv.classify_verdicts(low)[1]["target"]["met"] is False
    tie = [dict(r, robust=32.0) if r["role"] == "rslad" and r["seed"] == 0 else r for r in runs]
    assert adv.classify_verdicts(tie)[1]["target"]["met"] is False
    assert "not yet measurable" in adv.classify_verdicts(runs[:3])[0][-1]


def test_multitask_target_half_of_clean_and_plain_plus_margin() -> None:
    def mt(role, seed, m50, miou, r50, rmiou):
        return {"role": role, "seed": seed, "map50": m50, "miou": miou, "robust_map50": r50, "robust_miou": rmiou}

    runs = [mt("plain", s, 0.40, 0.30, 0.05, 0.08) for s in range(3)]
    runs += [mt("adv_kd", s, 0.36, 0.28, 0.20, 0.15) for s in range(3)]
    lines, summary = adv.multitask_verdicts(runs)
    assert summary["met"] is True and summary["miou"]["plain_robust"] == 0.08
    worse = [dict(r, robust_miou=0.12) if r["role"] == "adv_kd" else r for r in runs]  # 0.12 < 0.08 + 0.05
    _, summary = adv.multitask_verdicts(worse)
    assert summary["miou"]["met"] is False and summary["map50"]["met"] is True and summary["met"] is False
    half = [dict(r, robust_map50=0.17) if r["role"] == "adv_kd" else r for r in runs]  # 0.17 < 0.36 / 2
    assert adv.multitask_verdicts(half)[1]["map50"]["met"] is False


def test_transfer_target_distilled_five_points_above_labels_at_every_eps() -> None:
    runs = [{"role": "target", "seed": 0, "clean": 90.0}]
    for s in range(3):
        runs += [{"role": "distilled", "seed": s, "transfer@0.03": 60.0 + s, "transfer@8/255": 50.0 + s},
                 {"role": "labels", "seed": s, "transfer@0.03": 50.0 + s, "transfer@8/255": 47.0 + s},
                 {"role": "noise", "seed": s, "transfer@0.03": 3.0, "transfer@8/255": 2.0}]
    lines, summary = transfer.verdicts(runs, ["0.03", "8/255"])
    assert summary["0.03"]["margin"] == pytest.approx(10.0) and summary["0.03"]["met"] is True
    assert summary["8/255"]["margin"] == pytest.approx(3.0) and summary["8/255"]["met"] is False
    assert summary["met"] is False and lines[-1] == "target (every eps): NOT MET"
    assert "noise 3.0" in lines[1]


def test_a_sitting_with_another_budget_stops(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"budget": {"epochs": 10, "eps": 0.03, "seeds": [0]}, "runs": []}))
    adv.check_budget(path, {"epochs": 10, "eps": 0.03, "seeds": [0, 1]}, force=False)  # seeds may grow
    with pytest.raises(SystemExit, match="epochs=10"):
        adv.check_budget(path, {"epochs": 5, "eps": 0.03}, force=False)
    adv.check_budget(path, {"epochs": 5}, force=True)


# -- --quick, end to end ------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


@pytest.mark.slow
def test_adversarial_quick_classification_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "adv"
    argv = ["--quick", "--out", str(out), "--roles", "pgd_at", "rslad_nat", "--device", "cpu"]
    payload = adv.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "adversarial" and saved["budget"]["eval_steps"] == 2
    runs = {r["role"]: r for r in saved["runs"]}
    assert list(runs) == ["teacher_nat", "teacher_at", "pgd_at", "rslad_nat"]
    for role, r in runs.items():
        assert all(k in r for k in RECORD_KEYS), role
        assert 0.0 <= r["robust"] <= 100.0 and 0.0 <= r["clean"] <= 100.0 and _finite(r["wall_s"]), role
        assert r["attack"]["name"] == "pgd" and r["attack"]["steps"] == 2 and r["attack"]["eps_255"] == pytest.approx(4)
        assert "map50" not in r
    assert runs["rslad_nat"]["teacher"] == "teacher_nat" and runs["pgd_at"]["teacher"] is None
    assert runs["teacher_at"]["loss"][0]["name"] == "trades"  # --teacher-at-loss default
    assert saved["budget"]["select"] == "robust"  # pgd_at's best.pt was chosen on robust val top-1:
    csv = (out / "runs" / "pgd_at_s0" / "results.csv").read_text().splitlines()
    assert "val/robust_top1" in csv[0].split(",")
    assert (out / "runs" / "pgd_at_s0" / "attack" / "attack.json").is_file()
    md = (out / "results.md").read_text()
    assert "| role | seeds | clean min / med / max | robust min / med / max |" in md and "| rslad_nat | 0 |" in md
    assert payload["derived"] == saved["derived"]
    # a second sitting runs nothing again
    stamp = (out / "runs" / "pgd_at_s0" / "test_metrics.json").stat().st_mtime_ns
    again = adv.main(argv)
    assert len(again["runs"]) == 4
    assert (out / "runs" / "pgd_at_s0" / "test_metrics.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_adversarial_quick_multitask_end_to_end(tmp_path: Path) -> None:
    from benchmarks.common import random_checkpoint
    from mtkd.datasets.synthetic import TESTBEDS, make_synthetic

    make_synthetic(tmp_path / "d", formats=("voc",), **{**TESTBEDS["small"], "n_train": 8, "n_val": 4, "n_test": 4})
    classes = (tmp_path / "d" / "voc" / "classes.txt").read_text().split()
    init = random_checkpoint(tmp_path / "init.pt", {"preset": "student_small"}, classes)
    teacher = random_checkpoint(tmp_path / "teacher.pt", {"preset": "teacher_small"}, classes, seed=1)
    out = tmp_path / "mt"
    adv.main(["--multitask", "--quick", "--data", str(tmp_path / "d"), "--init", str(init), "--teacher-ckpt",
              str(teacher), "--out", str(out), "--device", "cpu", "--mt-teacher-at", "1"])
    saved = json.loads((out / "results.json").read_text())
    runs = {r["role"]: r for r in saved["runs"]}
    assert sorted(runs) == sorted(adv.MT_TEACHERS + adv.MT_ROLES)
    for role, r in runs.items():
        assert all(_finite(r[k]) for k in ("map50", "miou", "robust_map50", "robust_miou")), role
        assert all(_finite(r[f"val_{k}"]) for k in ("map50", "miou", "robust_map50", "robust_miou")), role
        assert r["attack"]["eps_255"] == pytest.approx(4) and r["attack"]["steps"] == 1
        if role != "teacher":
            assert all(k in r for k in RECORD_KEYS) and r["steps"] == 1, role
    assert runs["teacher"]["checkpoint"] == str(teacher)
    cfg = (out / "runs" / "pgd_at_s0" / "config.yaml").read_text()
    assert "output: multitask" in cfg and "init.pt" in cfg
    t_cfg = (out / "runs" / "teacher_at_s0" / "config.yaml").read_text()
    assert "output: multitask" in t_cfg and "teacher.pt" in t_cfg and "teacher_small" in t_cfg
    kd_cfg = (out / "runs" / "adv_kd_s0" / "config.yaml").read_text()
    assert str(out / "runs" / "teacher_at_s0" / "best.pt") in kd_cfg
    assert "target (robust mAP50 and mIoU)" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        adv.parse(["--multitask"])  # --init is required


QUERY_ADV = {"objective": "kl", "target": "adv", "eps": 0.03, "steps": 1}
EXTRA_QUERIES = {
    "mixup": ([], {"name": "mixup_kd", "T": 4.0, "w_clean": 0.0, "w_mix": 1}, "extra/mixup_kd/mix"),
    "query_adv": (["--mixup", "off", "--query-adv", json.dumps(QUERY_ADV)],
                  {"name": "adv_kd", "T": 4.0, **QUERY_ADV, "black_box": True, "source": "student"},
                  "extra/adv_kd/adv"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(EXTRA_QUERIES))
def test_transfer_quick_end_to_end(tmp_path: Path, kind: str) -> None:
    args, entry, logged = EXTRA_QUERIES[kind]
    out = tmp_path / "tr"
    transfer.main(["--quick", "--out", str(out), "--device", "cpu"] + args)
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "transfer"
    roles = [(r["role"], r["seed"]) for r in saved["runs"]]
    assert sorted(roles) == [("distilled", 0), ("labels", 0), ("noise", 0), ("target", 1000)]
    assert (out / "runs" / "target_s1000" / "best.pt").is_file()
    runs = {r["role"]: r for r in saved["runs"]}
    for role in ("distilled", "labels", "noise"):
        for label in ("0.03", "8/255"):
            v = runs[role][f"transfer@{label}"]
            assert v is None or 0.0 <= v <= 100.0, (role, label)
            assert f"val_transfer@{label}" in runs[role], (role, label)
    assert runs["distilled"]["loss"] == [{"name": "st", "T": 4.0}, entry]
    assert runs["labels"]["loss"] == [{"name": "ce"}]
    assert logged in (out / "runs" / "distilled_s0" / "results.csv").read_text()
    assert runs["distilled"]["attack"]["name"] == "fgsm" and runs["noise"]["attack"]["name"] == "sign_noise"
    assert all(k in runs["distilled"] for k in RECORD_KEYS) and "whitebox@8/255" in runs["labels"]
    md = (out / "results.md").read_text()
    assert "transfer@0.03 min / med / max" in md and "| noise | 0 |" in md


@pytest.mark.parametrize("flag,value,match", [
    ("--mt-adv-kd", '{"det_kd": {"w_nope": 1}}', "adv_kd.det_kd: bad arguments"),
    ("--mt-adv-kd", "[1]", "--mt-adv-kd: expected a JSON object"),
    ("--mt-adv-kd", "{", "--mt-adv-kd: not JSON"),
])
def test_multitask_bad_adv_kd_options_fail_before_anything_is_written(tmp_path: Path, flag, value, match) -> None:
    from benchmarks.common import random_checkpoint
    from mtkd.errors import ConfigError

    init = random_checkpoint(tmp_path / "init.pt", {"preset": "student_small"}, ["a", "b"])
    with pytest.raises(ConfigError, match=match):
        adv.main(["--multitask", "--init", str(init), "--teacher-ckpt", str(init), "--out", str(tmp_path / "mt"),
                  flag, value])
    assert not (tmp_path / "mt").exists()


@pytest.mark.parametrize("value,match", [('{"nope": 1}', "--query-adv: bad arguments"),
                                         ("[1]", "expected a JSON object"),
                                         ('{"objective": "kl", "w_ce": 1}', "black_box: needs")])
def test_transfer_bad_query_adv_fails_before_anything_is_written(tmp_path: Path, value, match) -> None:
    from mtkd.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        transfer.main(["--out", str(tmp_path / "tr"), "--mixup", "off", "--query-adv", value])
    assert not (tmp_path / "tr").exists()


@pytest.mark.parametrize("args,match", [(["--mixup", '{"T": 0}'], "mixup_kd.T"),
                                        (["--mixup", "[1]"], "--mixup: expected a JSON object"),
                                        (["--query-adv", "{}"], "give --mixup off"),
                                        (["--labels-mixup", '{"T": 1}'], "--labels-mixup: bad arguments")])
def test_transfer_bad_mixup_fails_before_anything_is_written(tmp_path: Path, args, match) -> None:
    from mtkd.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        transfer.main(["--out", str(tmp_path / "tr")] + args)
    assert not (tmp_path / "tr").exists()


def test_transfer_target_seed_among_surrogate_seeds_fails_before_anything_is_written(tmp_path: Path) -> None:
    from mtkd.errors import ConfigError

    with pytest.raises(ConfigError, match="--target-seed 1 is one of --seeds"):
        transfer.main(["--out", str(tmp_path / "tr"), "--seeds", "0", "1", "--target-seed", "1"])
    assert not (tmp_path / "tr").exists()

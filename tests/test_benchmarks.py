"""The benchmark helpers (benchmarks/common.py), the kd_gain verdicts and one tiny kd_overhead run."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mtkd.datasets import make_synthetic
from mtkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import common  # noqa: E402


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / name / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(role: str, seed: int, m5095: float, m50: float, miou: float, wall: float = 10.0) -> dict:
    return {"role": role, "seed": seed, "epochs": 5, "steps": 50, "wall_s": wall, "map50_95": m5095,
            "map50": m50, "miou": miou, "params": 3.6e6, "gflops": 0.21}


FAKE = [_rec("teacher", 0, 0.50, 0.80, 0.70),
        _rec("plain", 0, 0.20, 0.40, 0.30), _rec("plain", 1, 0.24, 0.44, 0.36), _rec("plain", 2, 0.22, 0.50, 0.33),
        _rec("kd", 0, 0.30, 0.60, 0.52), _rec("kd", 1, 0.36, 0.66, 0.50), _rec("kd", 2, 0.33, 0.64, 0.56)]


def test_summarize_min_median_max_and_seeds() -> None:
    s = common.summarize(FAKE)
    assert list(s) == ["teacher", "plain", "kd"]
    assert s["plain"]["seeds"] == [0, 1, 2]
    assert s["plain"]["map50"] == {"min": 0.40, "median": 0.44, "max": 0.50, "n": 3}
    assert s["kd"]["miou"]["min"] == 0.50 and s["kd"]["miou"]["median"] == 0.52 and s["kd"]["miou"]["max"] == 0.56
    assert s["teacher"]["map50_95"]["n"] == 1


def test_gap_closed() -> None:
    assert common.gap_closed(0.8, 0.4, 0.6) == pytest.approx(0.5)
    assert common.gap_closed(0.8, 0.4, 0.3) == pytest.approx(-0.25)
    assert common.gap_closed(0.8, 0.4, 0.8) == pytest.approx(1.0)
    assert common.gap_closed(0.4, 0.4, 0.5) is None  # no gap: meaningless
    assert common.gap_closed(0.3, 0.4, 0.5) is None


def test_results_json_and_markdown_resume_and_replace(tmp_path: Path) -> None:
    res = common.Results(tmp_path, "fake", data="d", budget={"epochs": 5})
    for r in FAKE:
        res.add(r)
    res.write(derived=["a verdict"])
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["benchmark"] == "fake" and payload["data"] == "d" and payload["budget"] == {"epochs": 5}
    assert len(payload["runs"]) == len(FAKE)
    md = (tmp_path / "results.md").read_text()
    assert "| plain | 0,1,2 | 0.200 / 0.220 / 0.240 | 0.400 / 0.440 / 0.500 | 0.300 / 0.330 / 0.360 |" in md
    assert "- a verdict" in md

    again = common.Results(tmp_path, "fake", data="d2")  # a later sitting
    assert again.has("kd", 2) and not again.has("kd", 3)
    assert again.payload["budget"] == {"epochs": 5}
    again.add(_rec("kd", 2, 0.9, 0.9, 0.9))
    payload = json.loads((tmp_path / "results.json").read_text())
    kd2 = [r for r in payload["runs"] if r["role"] == "kd" and r["seed"] == 2]
    assert len(kd2) == 1 and kd2[0]["map50"] == 0.9
    assert payload["data"] == "d2" and payload["derived"] == ["a verdict"]


def test_make_record_from_report() -> None:
    report = {"map50_95": 0.1, "map50": 0.2, "miou": 0.3, "params": 10, "gflops": 0.5, "latency_ms": 2.0,
              "steps": 7, "train_wall_s": 3.5, "epochs_run": 2}
    rec = common.make_record("plain", 1, report, out="x")
    assert {k: rec[k] for k in common.RECORD_KEYS} == {
        "role": "plain", "seed": 1, "epochs": 2, "steps": 7, "wall_s": 3.5, "map50_95": 0.1, "map50": 0.2,
        "miou": 0.3, "params": 10.0, "gflops": 0.5}
    assert common.make_record("det", 0, {"map50": 0.2})["miou"] is None


def test_infer_format_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "voc" / "Annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_train.json").write_text("{}")
    (tmp_path / "data.yaml").write_text("names: [a]\n")
    assert common.infer_format(tmp_path / "voc") == ("voc", tmp_path / "voc")
    assert common.infer_format(tmp_path / "coco") == ("coco", tmp_path / "coco")
    assert common.infer_format(tmp_path / "data.yaml") == ("yolo", tmp_path / "data.yaml")
    assert common.infer_format(tmp_path) == ("voc", tmp_path / "voc")  # a make-synthetic folder
    assert common.data_overrides(tmp_path, "coco") == ["data.format=coco", f'data.root="{tmp_path / "coco"}"']
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="--format"):
        common.infer_format(tmp_path / "empty")


def test_kd_gain_verdicts_on_fake_records() -> None:
    kd_gain = _load("kd_gain")
    lines, summary = kd_gain.verdicts(FAKE, {"train_images": 9, "without_seg": 3, "without_det": 0})
    assert summary["premise"]["holds"]  # 0.80 - 0.44 and 0.70 - 0.33
    assert summary["gap_closed"]["kd"]["map50"] == pytest.approx((0.64 - 0.44) / (0.80 - 0.44))
    assert summary["gap_closed"]["kd"]["miou"] == pytest.approx((0.52 - 0.33) / (0.70 - 0.33))
    # targets on mAP50-95 and mIoU: (0.33 - 0.22) / (0.50 - 0.22) = 0.39 and 0.51 >= 0.3
    assert summary["gap_target_met"] is True
    # worst kd map50 0.60 > best plain 0.50; worst kd miou 0.50 > best plain 0.36
    assert summary["worst_kd_above_best_plain"]["kd"] == {"map50_95": True, "map50": True, "miou": True}
    assert summary["worst_seed_target_met"] is True
    assert any("3/9" in line for line in lines)
    # a KD median that closes less than 0.3 of the mAP50-95 gap misses the target
    low = [r if not (r["role"] == "kd" and r["seed"] == 2) else _rec("kd", 2, 0.23, 0.64, 0.56) for r in FAKE]
    low = [r if not (r["role"] == "kd" and r["seed"] == 1) else _rec("kd", 1, 0.25, 0.66, 0.50) for r in low]
    _, summary = kd_gain.verdicts(low)
    assert summary["gap_target_met"] is False and summary["worst_seed_target_met"] is False

    weak = [r if r["role"] != "teacher" else _rec("teacher", 0, 0.3, 0.5, 0.4) for r in FAKE]
    lines, summary = kd_gain.verdicts(weak)
    assert not summary["premise"]["holds"]
    assert any("FAILS" in line for line in lines)


def test_kd_gain_moves_runs_of_another_teacher_to_superseded_and_keeps_plain(tmp_path: Path) -> None:
    kd_gain = _load("kd_gain")
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"teacher after 170 epochs")
    b.write_bytes(b"teacher after 230 epochs")
    assert kd_gain.file_sha256(a) != kd_gain.file_sha256(b)
    payload = {"runs": [dict(r) for r in FAKE]}
    assert kd_gain.supersede_stale_runs(payload, kd_gain.file_sha256(a)) == 0  # first stamp: nothing stale
    assert kd_gain.supersede_stale_runs(payload, kd_gain.file_sha256(a)) == 0  # same teacher: kept
    n_plain = sum(r["role"] == "plain" for r in FAKE)
    moved = kd_gain.supersede_stale_runs(payload, kd_gain.file_sha256(b))
    assert moved == len(FAKE) - n_plain > 0
    assert {r["role"] for r in payload["runs"]} == {"plain"}
    assert payload["superseded"][0]["teacher_sha256"] == kd_gain.file_sha256(a)
    assert len(payload["superseded"][0]["runs"]) == moved  # nothing deleted
    assert payload["teacher_sha256"] == kd_gain.file_sha256(b)
    # a results.json written before hashing: only an explicit --teacher-changed supersedes
    legacy = {"runs": [dict(r) for r in FAKE]}
    assert kd_gain.supersede_stale_runs(dict(legacy), "x") == 0
    assert kd_gain.supersede_stale_runs(legacy, "x", changed=True) == moved


def test_kd_overhead_tiny_run(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "data", n_train=4, n_val=2, n_test=0, imgsz=(32, 48), formats=("voc",))
    kd_overhead = _load("kd_overhead")
    out = tmp_path / "out"
    payload = kd_overhead.main(["--data", str(tmp_path / "data"), "--out", str(out), "--batches", "1",
                                "--repeats", "2", "--warmup", "1", "--teacher-ckpt", str(tmp_path / "none.pt"),
                                "--teacher-preset", "student", "--set", "data.imgsz=64", "--set", "train.batch=2",
                                "--set", "loss.extra=[]"])
    runs = payload["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for r in runs:
        assert r["overhead"] == pytest.approx(r["kd_ms"] / r["plain_ms"])
        assert r["limit"] == pytest.approx(1 + r["teacher_fwd_ms"] / r["plain_ms"])
        assert r["limit"] > 1
    assert (out / "random_teacher.pt").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "kd_overhead" and len(saved["runs"]) == 2
    assert "overhead min / med / max" in (out / "results.md").read_text()


def test_yolo_kd_keeps_runs_of_an_earlier_sitting_and_refuses_another_budget(tmp_path) -> None:
    yk = _load("yolo_kd")
    budget = {"epochs": 20, "imgsz": 96, "student": "yolov8n.yaml", "kd": {"kd_cls": "1.0"}}
    path = tmp_path / "results.json"
    assert yk.load_previous(path, budget) == []
    run = {"role": "plain", "seed": 0, "map50_95": 0.01}
    path.write_text(json.dumps({"budget": {**budget, "seeds": [0], "total_s": 12.0}, "runs": [run]}))
    assert yk.load_previous(path, dict(budget)) == [run]  # seeds and total_s may differ
    with pytest.raises(SystemExit, match="epochs differ"):
        yk.load_previous(path, {**budget, "epochs": 5})
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        yk.load_previous(path, budget)


def test_yolo_kd_train_args_are_typed_and_a_bad_item_names_the_flag() -> None:
    yk = _load("yolo_kd")
    assert yk.parse_kv("optimizer=AdamW, lr0=0.002,cos_lr=true,", "--train-args") == {
        "optimizer": "AdamW", "lr0": 0.002, "cos_lr": True}
    assert yk.parse_kv("", "--train-args") == {}
    with pytest.raises(SystemExit, match="--train-args: 'lr0' is not key=value"):
        yk.parse_kv("optimizer=SGD,lr0", "--train-args")


def test_yolo_kd_summary_judges_mtkd_best_against_ultralytics_and_the_plain_baselines() -> None:
    yk = _load("yolo_kd")

    def run(role, seed, m, epochs=20):
        return {"role": role, "seed": seed, "epochs": epochs, "wall_s": 10.0, "epoch_s": 1.0, "epoch_cpu_s": 1.0,
                "map50_95": m, "map50": 2 * m}

    runs = [run("plain", 0, 0.010), run("plain", 1, 0.014),
            run("ultralytics_kd", 0, 0.008), run("ultralytics_kd", 1, 0.012),
            run("mtkd_out", 0, 0.013), run("mtkd_out", 1, 0.016),  # median above plain, worst seed below its best
            run("mtkd_out_feat", 0, 0.011), run("mtkd_out_feat", 1, 0.012),
            run("plain_wall", 0, 0.009, 34), run("plain_wall", 1, 0.0125, 34)]
    t = yk.summarise(runs)["target"]
    assert t["mtkd_best"] == "mtkd_out" and t["beats_median"] and t["beats_worst_seed"]
    assert t["vs_plain"] == {"beats_median": True, "worst_above_best": False}
    assert t["vs_plain_wall"] == {"beats_median": True, "worst_above_best": True}


def test_best_val_metrics_reads_the_best_epochs_row(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("epoch,step,val/map50_95,val/map50,val/miou\n"
                                          "1,10,,,\n2,20,0.1,0.2,0.3\n3,30,0.4,0.5,0.6\n")
    assert common.best_val_metrics(tmp_path, 2) == {"map50_95": 0.1, "map50": 0.2, "miou": 0.3}
    assert common.best_val_metrics(tmp_path, 1) == {}  # a row without validation
    assert common.best_val_metrics(tmp_path / "missing", 2) == {}
    rec = common.make_record("kd", 0, {"best_epoch": 3, "map50": 0.9}, out=tmp_path)
    assert rec["val_map50"] == 0.5 and rec["map50"] == 0.9  # test and val kept apart


def test_sweep_ranks_settings_by_median_val_score_and_refuses_bad_files(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "benchmarks" / "kd_gain" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    runs = [{"role": "plain", "seed": 0, "val_map50_95": 0.1, "val_miou": 0.3},
            {"role": "a", "seed": 0, "val_map50_95": 0.2, "val_miou": 0.4},
            {"role": "a", "seed": 1, "val_map50_95": 0.0, "val_miou": 0.0},
            {"role": "b", "seed": 0, "val_map50_95": 0.2, "val_miou": 0.3, "map50_95": 0.9, "miou": 0.9}]
    lines, rows = sweep.ranking(runs)
    # b: 0.25; a: median of 0.3 and 0.0 = 0.15; plain 0.2 -- test metrics never enter the score
    assert [r["role"] for r in rows] == ["b", "plain", "a"]
    assert "+0.0500 vs plain" in lines[0]
    good = tmp_path / "s.yaml"
    good.write_text("- {name: x, set: [loss.seg.alpha=0.7]}\n- {name: y}\n")
    assert [s["name"] for s in sweep.load_settings(good)] == ["x", "y"]
    for text in ("- {name: x}\n- {name: x}\n", "- {name: plain}\n", "{name: x}\n", "- {set: []}\n"):
        good.write_text(text)
        with pytest.raises(ConfigError, match="s.yaml"):
            sweep.load_settings(good)


def test_plateau_verdict_needs_a_rise_below_the_tolerance() -> None:
    plateau = _load("plateau")
    runs = []
    for seed, (a, b, c, d) in enumerate([(0.40, 0.30, 0.41, 0.30), (0.42, 0.32, 0.43, 0.33), (0.38, 0.30, 0.45, 0.36)]):
        runs.append({"role": "plain", "seed": seed, "steps": 100, "val_map50": a, "val_miou": b})
        runs.append({"role": "plain@2x", "seed": seed, "steps": 200, "val_map50": c, "val_miou": d})
    lines, summary = plateau.verdicts(runs, 0.01)
    # fitness per seed: E 0.35, 0.37, 0.34 -> median 0.35; 2E 0.355, 0.38, 0.405 -> median 0.38
    assert summary["plain"]["val_fitness"] == pytest.approx(0.35)
    assert summary["plain"]["rise"] == pytest.approx(0.03)
    assert summary["plain"]["plateau"] is False and "NOT at plateau" in lines[0]
    lines, summary = plateau.verdicts(runs, 0.05)
    assert summary["plain"]["plateau"] is True and "teacher" not in summary


def test_recorder_adds_finished_runs_with_extras_and_skips_failed_ones(tmp_path: Path, capsys) -> None:
    res = common.Results(tmp_path, "fake")
    refreshed = []
    on_done = common.recorder(res, "fake", lambda: refreshed.append(len(res.runs)),
                              lambda rec: {"double_map50": 2 * rec["map50"]})
    on_done(("kd", 1, tmp_path / "r", {"time_budget_s": 5.0}), {"map50": 0.25, "steps": 3}, 7.0, None)
    on_done(("kd", 2, tmp_path / "r2"), None, 0.0, ConfigError("data.root: missing"))
    assert [(r["role"], r["seed"]) for r in res.runs] == [("kd", 1)]
    rec = res.runs[0]
    assert rec["time_budget_s"] == 5.0 and rec["total_s"] == 7.0 and rec["double_map50"] == 0.5
    assert refreshed == [1]
    assert "[fake] kd seed 2 failed: data.root: missing" in capsys.readouterr().out


def test_plateau_reuses_only_identically_trained_runs(tmp_path) -> None:
    from mtkd.errors import MtkdError

    plateau = _load("plateau")
    src = tmp_path / "kd.json"
    runs = [{"role": "plain", "seed": 0, "epochs": 6}, {"role": "plain", "seed": 1, "epochs": 3},
            {"role": "kd", "seed": 0, "epochs": 6}, {"role": "plain", "seed": 7, "epochs": 6}]
    src.write_text(json.dumps({"data": "d", "budget": {"overrides": ["a=1"]}, "runs": runs}))
    got = plateau.reusable(str(src), "d", {"plain": 6}, ["a=1"], [0, 1, 2])
    assert [(r["role"], r["seed"]) for r in got] == [("plain", 0)]
    assert plateau.reusable(None, "d", {"plain": 6}, [], [0]) == []
    with pytest.raises(MtkdError, match="overrides"):
        plateau.reusable(str(src), "d", {"plain": 6}, [], [0])
    with pytest.raises(MtkdError, match="data"):
        plateau.reusable(str(src), "other", {"plain": 6}, ["a=1"], [0])

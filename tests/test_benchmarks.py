"""The benchmark helpers (benchmarks/common.py), the kd_gain verdicts and one tiny kd_overhead run."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from mtkd.datasets import make_synthetic
from mtkd.errors import ConfigError, MtkdError

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
    assert "| 3.60M | 0.210 |" in md  # params in millions
    tiny = common.markdown({"benchmark": "t", "runs": [dict(_rec("p", s, 0.1, 0.2, 0.3), params=42837 + s)
                                                       for s in range(3)]})
    assert "| 0.04M |" in tiny  # also below 0.1 M, where a median of ints is a float

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
    from mtkd.datasets import infer_format

    assert infer_format(tmp_path / "voc") == ("voc", tmp_path / "voc")
    assert infer_format(tmp_path / "coco") == ("coco", tmp_path / "coco")
    assert infer_format(tmp_path / "data.yaml") == ("yolo", tmp_path / "data.yaml")
    assert infer_format(tmp_path) == ("voc", tmp_path / "voc")  # a make-synthetic folder
    assert common.data_overrides(tmp_path) == ["data.format=voc", f'data.root="{tmp_path / "voc"}"']
    assert common.data_overrides(tmp_path, "coco") == ["data.format=coco", f'data.root="{tmp_path / "coco"}"']
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^data.root .*empty: .*; pass data.format$"):
        infer_format(tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"^--data .*empty: .*; pass --format$"):
        common.data_overrides(tmp_path / "empty")


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


def test_interleaved_plan_is_seed_major_and_rotates_the_role_order() -> None:
    plan = common.interleaved_plan(["a", "b", "c"], [5, 6, 7, 8])
    assert plan[:3] == [("a", 5), ("b", 5), ("c", 5)]
    assert plan[3:6] == [("b", 6), ("c", 6), ("a", 6)]
    assert plan[6:9] == [("c", 7), ("a", 7), ("b", 7)]
    assert plan[9:] == [("a", 8), ("b", 8), ("c", 8)]
    assert common.interleaved_plan([], [0]) == []


def test_check_budget_stops_on_a_changed_key_only(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    common.check_budget(path, {"epochs": 5}, ("epochs",), "x")  # no file: nothing to compare
    path.write_text(json.dumps({"budget": {"epochs": 5, "jobs": 2, "kd": {"kd_cls": 0.5}}}))
    common.check_budget(path, {"epochs": 5, "jobs": 1}, ("epochs", "kd"), "x")  # jobs not checked, kd absent here
    with pytest.raises(SystemExit, match=r"\[x\] .*results.json: its runs used epochs=5, this sitting 6"):
        common.check_budget(path, {"epochs": 6}, ("epochs",), "x")
    with pytest.raises(SystemExit, match="kd="):
        common.check_budget(path, {"kd": {"kd_cls": 1.0}}, ("kd",), "x")
    common.check_budget(path, {"epochs": 6}, ("epochs",), "x", force=True)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        common.check_budget(path, {"epochs": 5}, ("epochs",), "x")


def test_yolo_kd_plan_interleaves_roles_and_runs_plain_wall_after_its_reference() -> None:
    yk = _load("yolo_kd")
    first, second = yk.plan(list(yk.ROLES), [6, 7])
    assert first[:4] == [("plain", 6), ("ultralytics_kd", 6), ("mtkd_out", 6), ("mtkd_out_feat", 6)]
    assert first[4:] == [("ultralytics_kd", 7), ("mtkd_out", 7), ("mtkd_out_feat", 7), ("plain", 7)]
    assert second == [("plain_wall", 6), ("plain_wall", 7)]
    assert yk.plan(["plain", "mtkd_out"], [0])[1] == []


def test_yolo_kd_role_args() -> None:
    yk = _load("yolo_kd")
    base = {"model": "s.pt", "epochs": 20, "seed": 6}
    kd = {"kd_cls": 0.25, "kd_t": 2.0}
    t = Path("/t.pt")
    assert yk.role_args("plain", base, t, kd, 1.0) == base
    assert yk.role_args("ultralytics_kd", base, t, kd, 1.0) == {**base, "distill_model": "/t.pt"}
    assert yk.role_args("mtkd_out", base, t, kd, 1.0) == {**base, **kd, "kd_teacher": "/t.pt", "kd_feat": 0.0}
    assert yk.role_args("mtkd_out_feat", base, t, kd, 1.5)["kd_feat"] == 1.5
    assert yk.role_args("plain_wall", base, t, kd, 1.0, {"loop_s": 360.0})["time"] == pytest.approx(0.1)
    assert yk.role_args("plain_wall", base, t, kd, 1.0, None) is None
    # what a run is given is what mtkd yolo train parses back
    assert yk.parse_tokens(yk.tokens({**base, **kd, "val": False}), "run") == {**base, **kd, "val": False}


def test_yolo_kd_tokens_are_typed_by_the_cli_parser_and_a_bad_one_names_the_flag() -> None:
    yk = _load("yolo_kd")
    assert yk.parse_tokens(["optimizer=AdamW", "lr0=0.002", "cos_lr=true"], "--train-args") == {
        "optimizer": "AdamW", "lr0": 0.002, "cos_lr": True}
    assert yk.parse_tokens([], "--train-args") == {}
    with pytest.raises(ConfigError, match="--train-args: lr0: expected key=value"):
        yk.parse_tokens(["optimizer=SGD", "lr0"], "--train-args")


def test_yolo_kd_needs_a_test_split_in_the_users_data(tmp_path: Path) -> None:
    yk = _load("yolo_kd")
    data = tmp_path / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    args = yk.parse(["--data", str(data)])
    with pytest.raises(ConfigError, match="data.yaml: no 'test' entry"):
        yk.ensure_data(args, tmp_path)
    data.write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames: [a, b]\n")
    assert yk.ensure_data(args, tmp_path) == (data.resolve(), 2)


def test_yolo_kd_weights_come_from_kd_then_the_val_sweep_then_mtkds_defaults(tmp_path: Path) -> None:
    from mtkd.yolo.trainer import KD_DEFAULTS

    yk = _load("yolo_kd")
    kd, source = yk.resolve_kd(None, tmp_path)
    assert kd == {k: KD_DEFAULTS[k] for k in ("kd_cls", "kd_dfl", "kd_obj", "kd_t")} and source.startswith("mtkd")
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(
        {"runs": [], "choice": {"setting": "x0.5", "kd": yk.sweep_kd(0.5)}}))
    kd, source = yk.resolve_kd(None, tmp_path)
    assert kd == {**yk.sweep_kd(0.5), "kd_t": KD_DEFAULTS["kd_t"]} and source.endswith(": x0.5")
    assert yk.resolve_kd(["kd_cls=0.3", "kd_t=1"], tmp_path) == ({"kd_cls": 0.3, "kd_t": 1}, "--kd")
    for bad in (["kd_feat=1"], ["lr0=0.1"], ["kd_bogus=1"]):
        with pytest.raises(ConfigError, match="--kd: .* is not an output KD argument"):
            yk.resolve_kd(bad, tmp_path)


def _yk_run(role, seed, test, val=None, epoch_s=1.0):
    """A yolo_kd record: test mAP50-95 ``test``, val mAP50-95 ``val`` (default the same)."""
    return {"role": role, "seed": seed, "epochs": 20, "map50_95": test, "map50": 2 * test,
            "val_map50_95": test if val is None else val, "epoch_s": epoch_s}


def test_yolo_kd_verdict_needs_the_worst_mtkd_out_seed_above_the_best_plain_seed_on_test() -> None:
    yk = _load("yolo_kd")
    runs = [_yk_run("teacher", 0, 0.08), _yk_run("plain", 6, 0.010), _yk_run("plain", 7, 0.014),
            _yk_run("ultralytics_kd", 6, 0.008, epoch_s=2.0), _yk_run("ultralytics_kd", 7, 0.012, epoch_s=2.0),
            _yk_run("mtkd_out", 6, 0.015, val=0.0, epoch_s=1.8), _yk_run("mtkd_out", 7, 0.016, val=0.0, epoch_s=1.8),
            _yk_run("mtkd_out_feat", 6, 0.013), _yk_run("mtkd_out_feat", 7, 0.020),
            _yk_run("plain_wall", 6, 0.03), _yk_run("plain_wall", 7, 0.03)]
    lines, summary = yk.verdicts(runs, prepare_s=120.0)
    assert summary["target_met"] is True  # judged on test: the val metrics (0.0) do not enter
    assert summary["mtkd_out"]["vs_ultralytics_kd"]["beats_worst_seed"] is True
    assert summary["mtkd_out"]["vs_ultralytics_kd"]["epoch_time_ratio"] == pytest.approx(0.9)
    assert summary["mtkd_out"]["vs_plain_wall"] == {"beats_median": False, "worst_above_best": False}
    assert summary["mtkd_out_feat"]["worst_above_best_plain"] is False
    assert any("target: MET" in x and "0.0150 vs 0.0140" in x for x in lines)
    assert any("mtkd_out_feat" in x and "reported only" in x for x in lines)
    assert lines[0].startswith("prepare (once, side by side, 2.0 min wall): teacher reused, test mAP50-95 0.08")
    runs[0].update(wall_s=60.0, total_s=90.0)
    assert "teacher 20 epochs, training 1.0 min (1.5 min in all)" in yk.verdicts(runs)[0][0]
    runs[5]["map50_95"] = 0.014  # a tie with plain's best seed is not above it
    assert yk.verdicts(runs)[1]["target_met"] is False
    assert yk.verdicts([_yk_run("mtkd_out", 6, 0.1)])[0] == ["target: not yet measurable (no plain runs)"]


def test_yolo_kd_sweep_chooses_on_val_only() -> None:
    yk = _load("yolo_kd")
    runs = [_yk_run("plain", 100, 0.9, val=0.010),
            _yk_run("mtkd_out@x0.5", 100, 0.0, val=0.014), _yk_run("mtkd_out@x0.5", 101, 0.0, val=0.012),
            _yk_run("mtkd_out@x2", 100, 0.9, val=0.011), _yk_run("mtkd_out@x2", 101, 0.9, val=0.013)]
    lines, winner = yk.sweep_ranking(runs)
    assert winner == "x0.5"  # median 0.013 vs 0.012; the test metrics favour x2 and are ignored
    assert lines[0].startswith("chosen on val: x0.5 (kd_cls=0.25 kd_dfl=0.125 kd_obj=0.05)")
    assert "+0.0030 vs plain" in lines[1]
    assert yk.sweep_ranking([]) == ([], None)


def test_best_val_metrics_reads_the_best_epochs_row(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("epoch,step,val/map50_95,val/map50,val/miou\n"
                                          "1,10,,,\n2,20,0.1,0.2,0.3\n3,30,0.4,0.5,0.6\n")
    assert common.best_val_metrics(tmp_path, 2) == {"map50_95": 0.1, "map50": 0.2, "miou": 0.3}
    assert common.best_val_metrics(tmp_path, 1) == {}  # a row without validation
    assert common.best_val_metrics(tmp_path / "missing", 2) == {}
    rec = common.make_record("kd", 0, {"best_epoch": 3, "map50": 0.9}, out=tmp_path)
    assert rec["val_map50"] == 0.5 and rec["map50"] == 0.9  # test and val kept apart


def _load_sweep():
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "benchmarks" / "kd_gain" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_ranks_settings_by_median_val_score_and_refuses_bad_files(tmp_path: Path) -> None:
    sweep = _load_sweep()
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


@pytest.mark.parametrize("settings", sorted(p.name for p in (ROOT / "benchmarks" / "kd_gain").glob("sweep*.yaml")))
def test_every_committed_sweep_setting_builds_its_losses(settings: str) -> None:
    """Each setting of a committed sweep file, applied to kd.yaml, gives a config whose losses build."""
    from mtkd.engine.config import load_config
    from mtkd.losses.composer import LossComposer

    sweep = _load_sweep()
    items = sweep.load_settings(ROOT / "benchmarks" / "kd_gain" / settings)
    assert items
    for item in items:
        cfg = load_config(ROOT / "mtkd" / "configs" / "small" / "kd.yaml", item.get("set", []))
        composer = LossComposer(cfg["loss"], with_teacher=True)
        assert len(composer.extra) == len(cfg["loss"]["extra"]), item["name"]


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


def test_reusable_runs_take_only_identical_runs_and_refuse_other_data_or_overrides(tmp_path: Path) -> None:
    src = tmp_path / "results.json"
    runs = [{"role": "plain", "seed": 0, "epochs": 6, "val_map50": 0.1}, {"role": "plain", "seed": 1, "epochs": 12},
            {"role": "kd", "seed": 0, "epochs": 6}, {"role": "plain", "seed": 5, "epochs": 6}]
    src.write_text(json.dumps({"data": "d", "budget": {"overrides": ["a=1"]}, "runs": runs}))
    got = common.reusable_runs(str(src), "d", {"plain": 6}, ["a=1"], [0, 1])
    assert [(r["role"], r["seed"]) for r in got] == [("plain", 0)]
    assert common.reusable_runs(None, "d", {"plain": 6}, [], [0]) == []
    with pytest.raises(MtkdError, match="data"):
        common.reusable_runs(str(src), "other", {"plain": 6}, ["a=1"], [0])
    with pytest.raises(MtkdError, match="overrides"):
        common.reusable_runs(str(src), "d", {"plain": 6}, [], [0])
    with pytest.raises(MtkdError, match="not found"):
        common.reusable_runs(str(tmp_path / "none.json"), "d", {"plain": 6}, [], [0])


def test_plateau_reuses_an_earlier_2x_run_as_its_e_run_and_prefers_a_direct_e_run(tmp_path: Path) -> None:
    src = tmp_path / "results.json"
    runs = [{"role": "teacher@2x", "seed": 0, "epochs": 16, "val_map50": 0.6},
            {"role": "teacher@2x", "seed": 1, "epochs": 16, "val_map50": 0.7},
            {"role": "teacher", "seed": 1, "epochs": 16, "val_map50": 0.8},
            {"role": "teacher", "seed": 2, "epochs": 8, "val_map50": 0.5},
            {"role": "teacher@2x", "seed": 2, "epochs": 32, "val_map50": 0.9}]
    src.write_text(json.dumps({"data": "d", "budget": {"overrides": []}, "runs": runs}))
    got = common.reusable_e_runs(str(src), "d", {"teacher": 16}, [], [0, 1, 2])
    # seed 2 has no run at 16 epochs; seed 1's direct E run comes before its renamed 2x run
    assert [(r["role"], r["seed"], r["val_map50"], r.get("reused_role")) for r in got] == [
        ("teacher", 1, 0.8, None), ("teacher", 0, 0.6, "teacher@2x"), ("teacher", 1, 0.7, "teacher@2x")]


def test_reused_teacher_record_gets_val_metrics_from_its_checkpoint_folder(tmp_path: Path) -> None:
    plateau = _load("plateau")
    run = tmp_path / "teacher"
    run.mkdir()
    (run / "test_metrics.json").write_text(json.dumps({"best_epoch": 2}))
    (run / "results.csv").write_text("epoch,val/map50_95,val/map50,val/miou\n1,0.1,0.2,0.3\n2,0.2,0.5,0.4\n")
    rec = {"role": "teacher", "seed": 0, "checkpoint": str(run / "best.pt")}
    filled = common.with_val_metrics(rec)
    assert filled["val_map50"] == 0.5 and filled["val_miou"] == 0.4
    assert plateau.val_fitness(filled) == pytest.approx(0.45)
    assert common.with_val_metrics({"role": "teacher", "seed": 0}) == {"role": "teacher", "seed": 0}


def test_recorder_adds_finished_runs_with_extras_and_skips_failed_ones(tmp_path: Path, capsys) -> None:
    res = common.Results(tmp_path, "fake")
    refreshed = []
    on_done = common.recorder(res, "fake", lambda: refreshed.append(len(res.runs)),
                              lambda rec: {"double_map50": 2 * rec["map50"]})
    on_done(("kd", 1, tmp_path / "r", {"time_budget_s": 5.0}),
            {"map50": 0.25, "steps": 3, "record": {"epoch_s": 0.5}}, 7.0, None)
    on_done(("kd", 2, tmp_path / "r2"), None, 0.0, ConfigError("data.root: missing"))
    assert [(r["role"], r["seed"]) for r in res.runs] == [("kd", 1)]
    rec = res.runs[0]
    assert rec["time_budget_s"] == 5.0 and rec["total_s"] == 7.0 and rec["double_map50"] == 0.5
    assert rec["epoch_s"] == 0.5  # the job's own measurements join the record
    assert refreshed == [1]
    assert "[fake] kd seed 2 failed: data.root: missing" in capsys.readouterr().out


@pytest.mark.slow
def test_yolo_kd_quick_run_scores_deployed_students_on_test(tmp_path: Path) -> None:
    """``--quick`` end to end with a reused (random) teacher: each role through the users' path, scored on test."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    yk = _load("yolo_kd")
    out = tmp_path / "yk"
    data, _ = yk.ensure_data(yk.parse(["--quick", "--out", str(out)]), out)
    teacher = yk.save_init("yolov8s.yaml", data, 1, tmp_path / "teacher.pt")
    payload = yk.main(["--quick", "--out", str(out), "--teacher", str(teacher), "--pretrain-epochs", "0",
                       "--roles", "plain", "ultralytics_kd", "mtkd_out"])
    runs = {r["role"]: r for r in payload["runs"]}
    assert set(runs) == {"teacher", "plain", "ultralytics_kd", "mtkd_out"}
    student = sum(p.numel() for p in DetectionModel("yolov8n.yaml", nc=12, verbose=False).parameters())
    for role in ("plain", "ultralytics_kd", "mtkd_out"):
        r = runs[role]
        assert r["epochs"] == 1 and r["steps"] == 2 and r["wall_s"] > 0 and r["epoch_s"] > 0
        assert r["params"] == student  # the deployed student, not Ultralytics' distillation wrapper
        assert (Path(r["out"]) / "test").is_dir() and r["map50_95"] is not None and r["val_map50_95"] is not None
    assert runs["teacher"]["reused"] and runs["teacher"]["params"] > student
    assert torch.load(runs["mtkd_out"]["weights"], weights_only=False)["mtkd"]["distilled"]  # ran mtkd yolo train
    assert payload["budget"]["kd_source"].startswith("mtkd defaults")
    assert any("target: NOT MET" in x or "target: MET" in x for x in payload["derived"])
    # a second sitting keeps the runs; another budget stops
    assert yk.main(["--quick", "--out", str(out), "--teacher", str(teacher), "--pretrain-epochs", "0",
                    "--roles", "plain"])["runs"] == payload["runs"]
    with pytest.raises(SystemExit, match="epochs=1, this sitting 2"):
        yk.main(["--quick", "--out", str(out), "--teacher", str(teacher), "--pretrain-epochs", "0", "--epochs", "2"])


def test_run_jobs_records_run_errors_but_stops_when_interrupted() -> None:
    """A bad run is recorded and the next one runs; SIGINT/SIGTERM (Interrupted) ends the benchmark."""
    from benchmarks.common import run_jobs
    from mtkd.errors import ConfigError, Interrupted

    ran, done = [], []

    def job(config, overrides, seed, out, epochs, threads):
        ran.append(seed)
        if config == "bad":
            raise ConfigError("bad config")
        if config == "stop":
            raise Interrupted("interrupted by SIGTERM", 143, "train.resume=true")
        return {"seed": seed}, 0.0

    def on_done(key, report, secs, error):
        done.append((key, None if error is None else type(error).__name__))

    jobs = [(k, {"config": c, "overrides": [], "seed": k, "out": "x"}) for k, c in
            enumerate(("ok", "bad", "ok", "stop", "ok"))]
    with pytest.raises(Interrupted):
        run_jobs(jobs, 1, None, on_done, desc="t", job=job)
    assert ran == [0, 1, 2, 3]
    assert done == [(0, None), (1, "ConfigError"), (2, None)]


def _load_script(path: str):
    spec = importlib.util.spec_from_file_location("bench_" + Path(path).stem, ROOT / "benchmarks" / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seg_errors_splits_the_confusion_into_finding_and_naming() -> None:
    import torch

    seg_errors = _load_script("kd_gain/seg_errors.py")
    # rows = target (0 background, classes 1 and 2), columns = prediction
    m = torch.tensor([[80, 4, 6],
                      [2, 10, 8],
                      [8, 2, 20]])
    got = seg_errors.split_confusion(m)
    # objects in labels and prediction: 10+8+2+20 = 40; background called object 10, object called background 10
    assert got["fg_iou"] == pytest.approx(40 / 60)
    assert got["fg_class_acc"] == pytest.approx(30 / 40)
    assert got["bg_iou"] == pytest.approx(80 / (80 + 10 + 10))
    ious = [80 / 100, 10 / (20 + 16 - 10), 20 / (30 + 34 - 20)]
    assert got["miou"] == pytest.approx(sum(ious) / 3)


def test_seg_errors_miou_matches_the_evaluator(tmp_path: Path) -> None:
    from mtkd.engine.config import dump_config, load_config
    from mtkd.engine.trainer import evaluate_checkpoint

    make_synthetic(tmp_path / "data", n_train=2, n_val=3, n_test=0, imgsz=(32, 48), formats=("voc",))
    seg_errors = _load_script("kd_gain/seg_errors.py")
    data = common.data_overrides(tmp_path / "data")
    cfg = load_config(ROOT / "mtkd/configs/small/student.yaml", [*data, "data.imgsz=64", "data.cache=false"])
    run = tmp_path / "runs" / "plain_s3"
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    common.random_checkpoint(run / "best.pt", cfg["model"], _classes(tmp_path / "data"))
    payload = seg_errors.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"),
                               f"plain={tmp_path}/runs/plain_s*"])
    (rec,) = payload["runs"]
    assert rec["role"] == "plain" and rec["seed"] == 3 and rec["split"] == "val"
    want = evaluate_checkpoint(cfg, run / "best.pt", split="val")
    assert rec["metrics"]["miou"] == pytest.approx(want["miou"], abs=1e-9)
    assert rec["params"] == want["params"] and rec["gflops"] == pytest.approx(want["gflops"])
    assert rec["epochs"] is None and rec["steps"] is None and rec["wall_s"] > 0  # random_checkpoint trained nothing
    assert 0.0 <= rec["metrics"]["fg_class_acc"] <= 1.0
    assert json.loads((tmp_path / "out" / "seg_errors.json").read_text())["runs"] == payload["runs"]
    assert "| plain | 3 |" in (tmp_path / "out" / "seg_errors.md").read_text()
    with pytest.raises(SystemExit, match="ROLE=GLOB"):
        seg_errors.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), f"kd={tmp_path}/none*"])


def _classes(root: Path) -> list:
    return (root / "voc" / "classes.txt").read_text().split()


def test_ema_probe_evaluates_raw_weights_and_extra_averages_of_one_run(tmp_path: Path) -> None:
    """The raw weights and an EMA of decay 0 (= the raw weights) must score alike; the
    trainer's own EMA with a long horizon is a different model, so the probe is not comparing
    one model with itself."""
    make_synthetic(tmp_path / "data", n_train=8, n_val=4, n_test=2, imgsz=(64, 64), formats=("voc",))
    spec = importlib.util.spec_from_file_location("ema_probe", ROOT / "benchmarks" / "plateau" / "ema_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe"
    probe.main(["small/student.yaml", "--name", "tiny", "--seed", "3", "--decays", "0.0", "--out", str(out),
                "--set", f"data.root={tmp_path / 'data' / 'voc'}", "--set", "train.epochs=2", "--set", "train.batch=4",
                "--set", "train.val_every=1", "--set", "train.ema_tau=1e-6", "--set", "train.ema_decay=0.9"])
    rows = json.loads((out / "tiny.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["raw"] == pytest.approx(r["ema0.0"])
    assert any(r["default"] != pytest.approx(r["raw"]) for r in rows)
    saved = json.loads((out / "results.json").read_text())
    roles = {r["role"]: r for r in saved["runs"]}
    assert set(roles) == {"tiny:default", "tiny:raw", "tiny:ema0.0"}
    assert roles["tiny:raw"]["seed"] == 3 and roles["tiny:raw"]["steps"] == 4


_STOP_SCRIPT = '''
import sys, time
from pathlib import Path


def job(config, overrides, seed, out, epochs, threads):
    from benchmarks import common
    from mtkd.errors import Interrupted

    Path(out, f"started_{seed}").touch()
    for _ in range(1200):
        if common._WORKER_STOP:  # a trainer would save last.pt here
            raise Interrupted("interrupted by SIGTERM at step 1", 143, "again")
        time.sleep(0.05)
    Path(out, f"finished_{seed}").touch()
    return {"seed": seed}, 0.0


if __name__ == "__main__":
    from benchmarks.common import run_jobs
    from mtkd.errors import Interrupted

    out = sys.argv[1]
    jobs = [(k, {"config": "c", "overrides": [], "seed": k, "out": out}) for k in range(5)]
    try:
        run_jobs(jobs, 2, 1, lambda *a: None, desc="t", job=job)
    except Interrupted as exc:
        print(exc, flush=True)
        sys.exit(exc.exit_code)
'''


def test_run_jobs_pool_stops_its_workers_when_the_parent_alone_gets_sigterm(tmp_path: Path) -> None:
    """SIGTERM to the benchmark process only: the workers are told, and no queued run starts."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "bench.py"
    script.write_text(_STOP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"started_{k}").exists() for k in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "interrupted by SIGTERM" in out
    assert sorted(p.name for p in tmp_path.glob("started_*")) == ["started_0", "started_1"]
    assert not list(tmp_path.glob("finished_*"))


def test_trainer_takes_a_repeated_signal_as_the_same_request() -> None:
    """The same SIGTERM delivered twice at once (group + forwarding parent) only sets the flag;
    a later second signal still stops at once."""
    import signal
    import time
    from types import SimpleNamespace

    from mtkd.engine import trainer as tr

    t = SimpleNamespace(signal=None, _signal_t=0.0)
    tr.Trainer._on_signal(t, signal.SIGTERM, None)
    tr.Trainer._on_signal(t, signal.SIGTERM, None)
    assert t.signal == signal.SIGTERM
    t._signal_t = time.monotonic() - tr.SIGNAL_REPEAT_S - 0.1
    with pytest.raises(KeyboardInterrupt):
        tr.Trainer._on_signal(t, signal.SIGINT, None)

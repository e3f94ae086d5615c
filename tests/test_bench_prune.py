"""benchmarks/prune: role names, step budgets, verdicts, onnxruntime timing and one --quick run."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import mtkd  # noqa: F401  (offline switches first)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _load():
    spec = importlib.util.spec_from_file_location("bench_prune", ROOT / "benchmarks" / "prune" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pb = _load()


def test_roles_and_recovery_budget() -> None:
    assert pb.role("kd", 0.5) == "kd" and pb.role("kd", 0.75) == "kd@0.75" and pb.role("pruned", 0.3) == "pruned@0.3"
    assert pb.arch_name("student", 0.5) == "student_f0.50" and pb.arch_name("teacher", None) == "teacher"
    assert pb.recovery_overrides(375, 250) == ["train.epochs=2", "train.max_steps=375"]
    assert pb.recovery_overrides(2, 4) == ["train.epochs=1", "train.max_steps=2"]
    args = pb.parse(["--quick", "--out", "/tmp/x", "--seeds", "3"])
    assert args.seeds == [3] and args.sizes == [0.5] and args.steps == 2 and args.data == "/tmp/x/data"
    assert args.set[:1] == ["train.batch=4"] and args.student == "/tmp/x/student/best.pt"
    full = pb.parse([])
    assert full.sizes == [0.75, 0.5, 0.3] and full.seeds == [0, 1, 2] and full.ort_runs == 50 and full.round_to == 1
    with pytest.raises(SystemExit):
        pb.parse(["--sizes", "0.5", "1.2"])


def _rec(role: str, seed: int, m50: float, miou: float, **kw) -> dict:
    return {"role": role, "seed": seed, "map50_95": m50 / 2, "map50": m50, "miou": miou, **kw}


def _runs() -> list:
    runs = [_rec("unpruned", 0, 0.40, 0.30, ort_ms=10.0, ort_ms_b1=1.0, gflops=0.013),
            _rec("pruned", 0, 0.10, 0.10, ort_ms=6.0, ort_ms_b1=0.8, flops_frac=0.49, ratio=0.45, size=0.5)]
    for s in range(3):
        runs += [_rec("finetune", s, 0.35 + 0.01 * s, 0.27, size=0.5),
                 _rec("kd", s, 0.39 + 0.001 * s, 0.29 + 0.001 * s, size=0.5),
                 _rec("kd_teacher", s, 0.37, 0.28 + 0.01 * s, size=0.5),
                 _rec("teacher_pruned", s, 0.45, 0.31, gflops=0.0128, ort_ms=12.0)]
    runs += [_rec("pruned@0.75", 0, 0.3, 0.25, flops_frac=0.72, size=0.75, ort_ms=8.0)]
    for s in range(3):
        runs.append(_rec("int8", s, 0.38, 0.28, fp32_map50_95=0.2, fp32_map50=0.39 + 0.01 * s, fp32_miou=0.29,
                         drop_map50_95=0.005, drop_map50=0.01 + 0.01 * s, drop_miou=0.01, onnx_mb=0.2,
                         fp32_onnx_mb=0.5, ort_ms=4.0, fp32_ort_ms=6.0, ort_ms_b1=1.0, fp32_ort_ms_b1=0.8,
                         calib_images=64, test_images=200, size=0.5))
    return runs


def test_verdicts_judge_the_half_flops_targets() -> None:
    lines, summary = pb.verdicts(_runs())
    kd, kdt = summary["targets"]["kd"], summary["targets"]["kd_teacher"]
    assert kd == {"keeps >= 95% of unpruned": True, "worst seed above best finetune seed": True,
                  "onnxruntime batch 16 >= 1.4x lower": True}
    # kd_teacher: median mAP50 0.37 < 0.95 x 0.40; worst mIoU 0.28 above best finetune 0.27, mAP50 0.37 = best finetune
    assert kdt["keeps >= 95% of unpruned"] is False and kdt["worst seed above best finetune seed"] is False
    assert summary["ort_speedup_b16"] == pytest.approx(10 / 6) and summary["ort_speedup_b1"] == pytest.approx(1.25)
    assert summary["half_flops"]["in_window"] is True
    assert summary["teacher_pruned_above_student"] == {"map50_95": True, "map50": True, "miou": True}
    assert any(line.startswith("target (kd): median keeps") and line.endswith(": MET") for line in lines)
    assert any(line.startswith("size 0.75 (0.720 of the FLOPs") for line in lines)
    q = summary["int8"]["int8"]
    assert q["metrics"]["map50"] == {"fp32": 0.40, "int8": 0.38, "drop": pytest.approx(0.02)}
    assert q["size_ratio"] == pytest.approx(0.4) and q["speedup_b16"] == pytest.approx(1.5)
    assert q["speedup_b1"] == pytest.approx(0.8) and "unpruned_int8" not in summary["int8"]
    line = next(x for x in lines if x.startswith("int8: the kd student at size 0.5 (seeds 0,1,2)"))
    assert "mAP50 0.4000 -> 0.3800 (drop +0.0200)" in line and "(0.40x)" in line and "speed-up 1.50x" in line
    # out of the window, slower than the target, a missing role
    runs = [dict(r, flops_frac=0.42, ort_ms=8.0) if r["role"] == "pruned" else r for r in _runs()
            if r["role"] != "finetune"]
    lines, summary = pb.verdicts(runs)
    assert summary["half_flops"]["in_window"] is False and "OUT" in lines[0]
    assert summary["targets"]["kd"]["onnxruntime batch 16 >= 1.4x lower"] is False
    assert summary["targets"]["kd"]["worst seed above best finetune seed"] is None
    # nothing pruned yet: nothing judged
    lines, summary = pb.verdicts([r for r in _runs() if r["role"] == "unpruned"])
    assert "not yet measurable" in lines[0] and summary["targets"]["kd"]["keeps >= 95% of unpruned"] is None


def test_latency_image_side_defaults_and_errors() -> None:
    assert pb.parse([]).ort_imgsz == 128  # the latency rows' side: 128 px
    assert pb.parse(["--quick"]).ort_imgsz == 0  # 0: the data's side
    assert pb.parse(["--ort-imgsz", "64"]).ort_imgsz == 64
    for bad in ("100", "-32", "16"):
        with pytest.raises(SystemExit):
            pb.parse(["--ort-imgsz", bad])


def test_a_sitting_with_other_settings_is_refused(tmp_path: Path) -> None:
    budget = {k: 1 for k in pb.CHECKED}
    (tmp_path / "results.json").write_text(json.dumps({"budget": budget}))
    pb.check_previous(tmp_path / "results.json", budget, force=False)
    with pytest.raises(SystemExit, match="student_sha256"):
        pb.check_previous(tmp_path / "results.json", dict(budget, student_sha256=2), force=False)
    pb.check_previous(tmp_path / "results.json", dict(budget, student_sha256=2), force=True)
    # sizes add up over sittings, each its own rows
    assert pb.all_sizes(tmp_path / "none.json", [0.5], force=False) == [0.5]
    (tmp_path / "results.json").write_text(json.dumps({"budget": {"sizes": [0.5]}}))
    assert pb.all_sizes(tmp_path / "results.json", [0.3, 0.75], force=False) == [0.75, 0.5, 0.3]
    assert pb.all_sizes(tmp_path / "results.json", [0.3], force=True) == [0.3]


def _onnx(path: Path, width: int) -> Path:
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}})
    return path


def test_ort_latency_times_each_model_at_each_batch(tmp_path: Path) -> None:
    paths = {"small": _onnx(tmp_path / "s.onnx", 2), "big": _onnx(tmp_path / "b.onnx", 96)}
    lat = pb.ort_latency(paths, 32, runs=7, warmup=1)
    assert set(lat) == {"small", "big"} and all(set(v) == {"ort_ms_b16", "ort_ms_b1"} for v in lat.values())
    assert all(math.isfinite(x) and x > 0 for v in lat.values() for x in v.values())
    # ~1000x the FLOPs: slower at both batch sizes, and batch 16 slower than batch 1
    assert lat["big"]["ort_ms_b16"] > lat["small"]["ort_ms_b16"] and lat["big"]["ort_ms_b1"] > lat["small"]["ort_ms_b1"]
    assert lat["big"]["ort_ms_b16"] > lat["big"]["ort_ms_b1"]
    assert pb.latency_fields(lat["big"]) == {"ort_ms": lat["big"]["ort_ms_b16"], "ort_ms_b1": lat["big"]["ort_ms_b1"]}


@pytest.mark.slow
def test_quick_run_end_to_end_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--quick", "--out", str(out), "--ort-imgsz", "96"]
    payload = pb.main(argv)
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(payload, default=str))
    runs = {r["role"]: r for r in saved["runs"]}
    assert set(runs) == {"unpruned", "teacher", "pruned", "finetune", "kd", "kd_teacher", "teacher_pruned", "int8",
                         "unpruned_int8"}
    for role, r in runs.items():
        assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("map50_95", "map50", "miou")), role
        assert r["ort_ms"] > 0 and r["ort_ms_b1"] > 0 and r["params"] > 0 and r["gflops"] > 0, role
        for key in ("role", "seed", "epochs", "steps", "wall_s", "ratio"):
            assert key in r, (role, key)
    for role in ("finetune", "kd", "kd_teacher", "teacher_pruned"):
        assert runs[role]["steps"] == runs[role]["budget_steps"] == 2, role
    assert runs["unpruned"]["ratio"] == 0.0 and runs["pruned"]["ratio"] > 0
    assert abs(runs["pruned"]["flops_frac"] - 0.5) <= 0.05
    assert runs["kd"]["params"] == runs["pruned"]["params"] < runs["unpruned"]["params"]
    assert runs["teacher_pruned"]["gflops"] <= runs["unpruned"]["gflops"] < runs["teacher"]["gflops"]
    assert runs["kd"]["ort_ms"] == runs["pruned"]["ort_ms"] == saved["latency"]["student_f0.50"]["ort_ms_b16"]
    md = (out / "results.md").read_text()
    assert "| kd_teacher | 0 |" in md and "target (kd): median keeps" in md
    assert (out / "runs" / "onnx" / "student_f0.50.onnx").is_file()
    # the latency rows are exported and timed at --ort-imgsz, not at the data's side
    import onnx

    assert saved["latency_settings"]["imgsz"] == saved["budget"]["ort_imgsz"] == 96
    dims = onnx.load(str(out / "runs" / "onnx" / "student.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1:] == [3, 96, 96]
    # INT8: the kd student's file, scored on the test split in onnxruntime, smaller, timed beside its FP32 file
    for role, src, arch in (("int8", "kd", "student_f0.50"), ("unpruned_int8", "unpruned", "student")):
        q = runs[role]
        assert q["source_role"] == src and q["arch"] == arch and q["split"] == "test" and q["test_images"] == 4
        assert q["params"] == runs[src]["params"] and q["steps"] == runs[src]["steps"]
        for m in ("map50_95", "map50", "miou"):
            assert math.isfinite(q[f"fp32_{m}"]) and q[f"drop_{m}"] == pytest.approx(q[f"fp32_{m}"] - q[m])
            assert q[f"fp32_{m}"] == pytest.approx(runs[src][m], abs=1e-3)  # the FP32 file scores as PyTorch
        int8, fp32 = Path(q["onnx"]), Path(q["fp32_onnx"])
        assert int8.name.endswith(".int8.onnx") and int8.stat().st_size == round(q["onnx_mb"] * 1e6)
        assert int8.stat().st_size < fp32.stat().st_size == round(q["fp32_onnx_mb"] * 1e6)
        lat = saved["int8_latency"][arch]
        assert q["ort_ms"] == lat["int8"]["ort_ms_b16"] and q["fp32_ort_ms"] == lat["fp32"]["ort_ms_b16"] > 0
        assert q["fp32_ort_ms_b1"] > 0
    assert runs["kd"]["onnx_mb"] == pytest.approx((out / "runs/onnx/student_f0.50.onnx").stat().st_size / 1e6)
    assert "| int8 | 0 |" in md and "int8: the kd student at size 0.5 (seeds 0)" in md
    assert "unpruned_int8: the unpruned student" in md

    # a second sitting prunes, times and trains nothing again
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs" / "kd_s0" / "test_metrics.json",
                                                 out / "runs" / "prune_student_f0.50" / "best.pt",
                                                 out / "runs" / "onnx" / "student.onnx",
                                                 Path(runs["int8"]["onnx"]))}
    again = pb.main(argv)
    assert [(r["role"], r["seed"]) for r in again["runs"]] == [(r["role"], r["seed"]) for r in saved["runs"]]
    assert again["latency"] == saved["latency"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    with pytest.raises(SystemExit, match="steps"):
        pb.main(argv + ["--steps", "3"])


# -- the YOLO variant (--yolo) ----------------------------------------------------------------------
def _load_yolo():
    spec = importlib.util.spec_from_file_location("bench_prune_yolo", ROOT / "benchmarks" / "prune" / "yolo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_yolo_settings_and_budget() -> None:
    py = _load_yolo()
    quick = py.parse(["--yolo", "--quick", "--out", "/tmp/x"])
    assert quick.seeds == [0] and quick.epochs == 1 and quick.n_train == 16 and quick.jobs == 1
    assert py.recovery_epochs(quick.epochs, quick.recovery) == 1
    full = py.parse(["--jobs", "2"])
    assert full.seeds == [0, 1, 2] and full.epochs == 20 and full.n_train == 4000 and full.size == 0.5
    assert full.ort_runs == 50 and full.round_to == 8 and py.recovery_epochs(full.epochs, full.recovery) == 5
    assert 20 * 60 <= py.estimate_s(full)["total"] <= 25 * 60  # the default sitting's size
    assert py.estimate_s(py.parse(["--jobs", "2", "--student", "s.pt"]))["student"] == 0
    for bad in (["--size", "1.2"], ["--ratio", "0"], ["--imgsz", "70"]):
        with pytest.raises(SystemExit):
            py.parse(bad)


def _yrec(role: str, seed: int, m: float, **kw) -> dict:
    return {"role": role, "seed": seed, "map50_95": m / 2, "map50": m, "epochs": 5, **kw}


def test_yolo_verdicts() -> None:
    py = _load_yolo()
    out = [1, 12, 84]
    runs = [_yrec("unpruned", 0, 0.80, params=3.0e6, gflops=0.10, ort_ms=10.0, ort_ms_b1=1.0, wall_s=600.0,
                  epochs=20, onnx_output=out),
            _yrec("pruned", 0, 0.20, params=1.5e6, gflops=0.049, ort_ms=6.0, ort_ms_b1=0.8, ratio=0.3,
                  onnx_output=out)]
    runs += [_yrec("finetune", s, 0.70 + 0.01 * s) for s in range(3)]
    runs += [_yrec("kd", s, 0.77 + 0.001 * s) for s in range(3)]
    lines, summary = py.verdicts(runs)
    assert summary["pruned"]["in_window"] is True and summary["pruned"]["same_outputs"] is True
    assert summary["pruned"]["flops_frac"] == pytest.approx(0.49)
    assert summary["ort_speedup_b16"] == pytest.approx(10 / 6)
    assert summary["kd"]["kept"]["map50"] == pytest.approx(0.771 / 0.8)
    assert summary["targets"] == {"keeps >= 95% of unpruned": True, "worst seed above best finetune seed": True,
                                  "onnxruntime batch 16 >= 1.4x lower": True}
    assert any(x.startswith("unpruned student: trained 20 epochs (10.0 min") for x in lines)
    assert sum(x.endswith(": MET") for x in lines) == 3
    # a different output shape, out of the window, kd below the best fine-tune, not faster
    runs[1] = dict(runs[1], gflops=0.07, ort_ms=9.0, onnx_output=[1, 12, 80])
    runs = [dict(r, map50=0.6) if r["role"] == "kd" else r for r in runs]
    lines, summary = py.verdicts(runs)
    assert summary["pruned"]["in_window"] is False and summary["pruned"]["same_outputs"] is False
    assert "NOT as the unpruned" in lines[1] and sum(x.endswith("NOT MET") for x in lines) == 3
    assert py.verdicts(runs[:1])[1] == {} and py.verdicts([])[0] == ["no unpruned student yet"]


@pytest.mark.slow
def test_yolo_quick_run_end_to_end_and_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--yolo", "--quick", "--out", str(out)]
    payload = pb.main(argv)  # benchmarks/prune/run.py --yolo
    saved = json.loads((out / "results.json").read_text())
    assert saved["benchmark"] == "prune_yolo" and saved == json.loads(json.dumps(payload, default=str))
    runs = {r["role"]: r for r in saved["runs"]}
    assert set(runs) == {"unpruned", "pruned", "finetune", "kd"}
    u, p = runs["unpruned"], runs["pruned"]
    assert p["params"] < u["params"] and p["gflops"] < u["gflops"] and 0 < p["ratio"] < 1
    assert abs(saved["pruning"]["gflops_after"] / saved["pruning"]["gflops_before"] - 0.5) <= 0.05
    for role, r in runs.items():
        for key in ("seed", "epochs", "steps", "wall_s", "params", "gflops", "ort_ms", "ort_ms_b1", "onnx"):
            assert key in r, (role, key)
        assert all(isinstance(r[m], float) and math.isfinite(r[m]) for m in ("map50_95", "map50")), role
        assert r["ort_ms"] > 0 and r["ort_ms_b1"] > 0, role
        assert r["onnx_output"] == u["onnx_output"] and Path(r["onnx"]).is_file(), role  # same outputs, exported
    for role in ("finetune", "kd"):  # trained at the pruned widths by mtkd yolo train, 1 epoch
        r = runs[role]
        assert r["params"] == p["params"] and r["epochs"] == 1 and r["steps"] == 2 and r["wall_s"] > 0
        assert r["ort_ms"] == p["ort_ms"] == saved["latency"]["pruned"]["ort_ms_b16"]
    assert u["epochs"] == 1 and u["wall_s"] > 0 and u["ratio"] == 0.0
    kd_yaml = {k.split(":")[0]: k.split(":")[1].strip()
               for k in (Path(runs["finetune"]["out"]) / "kd.yaml").read_text().splitlines()}
    assert kd_yaml["kd_cls"] == kd_yaml["kd_dfl"] == kd_yaml["kd_obj"] == kd_yaml["kd_feat"] == "0.0"
    md = (out / "results.md").read_text()
    assert "| kd | 0 |" in md and "target (kd): median keeps" in md

    # a second sitting trains, prunes and times nothing again
    stamps = {f: f.stat().st_mtime_ns for f in (Path(runs["kd"]["weights"]), Path(p["weights"]), Path(u["onnx"]))}
    again = pb.main(argv)
    assert [(r["role"], r["seed"]) for r in again["runs"]] == [(r["role"], r["seed"]) for r in saved["runs"]]
    assert again["latency"] == saved["latency"] and all(f.stat().st_mtime_ns == t for f, t in stamps.items())
    with pytest.raises(SystemExit, match="epochs"):
        pb.main(argv + ["--epochs", "2"])

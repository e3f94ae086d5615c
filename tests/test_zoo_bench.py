"""benchmarks/zoo/run.py on a tiny budget: results.json shape, Markdown tables, resume, teacher gate, verdicts."""
import importlib.util
import json
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo" / "run.py"


def _load():
    spec = importlib.util.spec_from_file_location("zoo_bench_run", RUN)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


zoo = _load()


def _args(tmp, *extra):
    return ["--out", str(tmp / "res"), "--runs", str(tmp / "runs"), "--seeds", "0", "--epochs", "1",
            "--teacher-epochs", "1", "--min-gap", "-100", "--classes", "3", "--per-class", "4",
            "--test-per-class", "2", "--imgsz", "16", "--set", "train.batch=6", "--set", "train.device=cpu",
            "--jobs", "1", *extra]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    assert zoo.main(_args(tmp, "--losses", "st")) == 0
    return tmp


def test_results_json_has_runs_with_the_required_keys(bench):
    payload = json.loads((bench / "res" / "results.json").read_text())
    assert payload["benchmark"] == "zoo" and payload["losses"] == ["st"]
    roles = [(r["role"], r["seed"]) for r in payload["runs"]]
    assert roles == [("teacher", 0), ("plain", 0), ("st", 0)]
    for r in payload["runs"]:
        assert r["epochs"] == 1 and r["steps"] == 2 and r["wall_s"] > 0 and 0.0 <= r["top1"] <= 100.0
        assert "map50" not in r and "error" not in r
    st = payload["runs"][2]["loss"]
    assert st == {"name": "st", "weight": zoo.CLASSIFY_LOSSES["st"][0], "T": 4.0}
    assert payload["runs"][0]["params"] > 10 * payload["runs"][1]["params"]  # ResNet-18 teacher vs CNN student


def test_markdown_has_one_row_per_role_and_a_verdict_per_loss(bench):
    md = (bench / "res" / "results.md").read_text()
    assert "| role | seeds | top1 min / med / max |" in md
    for role in ("teacher", "plain", "st"):
        assert f"| {role} | 0 |" in md
    assert sum(line.startswith("- st: median top1") for line in md.splitlines()) == 1


def test_resume_skips_finished_runs_and_adds_new_losses(bench):
    before = {r["role"]: r["total_s"] for r in json.loads((bench / "res" / "results.json").read_text())["runs"]}
    assert zoo.main(_args(bench, "--losses", "st", "logits")) == 0
    runs = json.loads((bench / "res" / "results.json").read_text())["runs"]
    assert [r["role"] for r in runs] == ["teacher", "plain", "st", "logits"]
    assert {r["role"]: r["total_s"] for r in runs if r["role"] in before} == before
    assert json.loads((bench / "res" / "results.json").read_text())["losses"] == ["st", "logits"]


def test_teacher_not_clearly_better_stops_before_distilling(bench):
    assert zoo.main(_args(bench, "--losses", "at", "--min-gap", "1000")) == 1
    payload = json.loads((bench / "res" / "results.json").read_text())
    assert "not distilling" in payload["stopped"]
    assert "at" not in [r["role"] for r in payload["runs"]]
    assert "**Stopped:** teacher top1" in (bench / "res" / "results.md").read_text()


def test_verdicts_and_failures():
    runs = [{"role": "teacher", "seed": 0, "top1": 90.0}]
    runs += [{"role": "plain", "seed": s, "top1": v} for s, v in enumerate((50.0, 52.0, 54.0))]
    runs += [{"role": "at", "seed": s, "top1": v} for s, v in enumerate((60.0, 58.0, 61.0))]
    runs += [{"role": "sp", "seed": s, "top1": v} for s, v in enumerate((40.0, 45.0, 55.0))]
    runs += [{"role": "nst", "seed": s, "top1": v} for s, v in enumerate((51.0, 53.0, 56.0))]
    runs += [{"role": "lwm", "seed": 0, "error": "loss 'lwm': feat: size mismatch"}]
    lines = {ln.split(":")[0]: ln for ln in zoo.verdicts(runs, ["at", "sp", "nst", "lwm"], "", "top1")}
    assert lines["at"].endswith("helps") and "closes 21% of the teacher-plain gap" in lines["at"]
    assert lines["sp"].endswith("hurts")
    assert "no clear difference" in lines["nst"]
    assert "FAILED" in lines["lwm"]
    md = zoo.markdown({"benchmark": "zoo", "runs": [dict(r, set="classify", epochs=1, steps=1, wall_s=1.0)
                                                    for r in runs], "derived": ["x"]})
    assert "- lwm seed 0: loss 'lwm': feat: size mismatch" in md and "| at | 0,1,2 |" in md


def test_loss_entries_follow_the_reference_and_dense_options():
    assert zoo.loss_entry("crd", 100, 5, dense=False)["nce_k"] == 400
    assert zoo.loss_entry("ft", 100, 5, dense=False)["para_steps"] == 5
    assert zoo.loss_entry("st", 100, 5, dense=True)["output"] == "seg"
    # LwM pairs stride-8 maps: f3 of the CNN teacher, f2 of a ResNet
    assert zoo.loss_entry("lwm", 100, 5, dense=False)["teacher_feat"] == "f3"
    assert zoo.loss_entry("lwm", 100, 5, dense=False, teacher_arch="resnet18")["teacher_feat"] == "f2"
    assert set(zoo.CLASSIFY_LOSSES) - set(zoo.DENSE_LOSSES) == {"bss", "sobolev", "lwm"}
    assert len(zoo.CLASSIFY_LOSSES) == 21


def test_parallel_jobs_record_every_run_and_keep_going_after_a_bad_one(bench, tmp_path):
    """--jobs 2: students train in two spawned processes; a run that fails with a
    config error is recorded as failed and the others still finish."""
    import sys

    sys.path.insert(0, str(RUN.parents[2]))
    from benchmarks import common

    seen = {}

    def on_done(key, report, secs, error):
        seen[key] = (report, secs, error)

    ok = dict(config=str(zoo.PLAIN_CFG), seed=0, epochs=1,
              overrides=[f"data.root={bench / 'runs' / 'data'}", "data.imgsz=16", "train.batch=6",
                         "train.device=cpu", "train.plots=false", "train.tensorboard=false"])
    jobs = [("a", {**ok, "out": str(tmp_path / "a")}),
            ("bad", {**ok, "overrides": ok["overrides"] + ["train.no_such_key=1"], "out": str(tmp_path / "bad")}),
            ("b", {**ok, "seed": 1, "out": str(tmp_path / "b")})]
    common.run_jobs(jobs, 2, 1, on_done, desc="t")
    assert set(seen) == {"a", "bad", "b"}
    assert seen["bad"][0] is None and "train.no_such_key" in str(seen["bad"][2])
    for key in ("a", "b"):
        report, secs, error = seen[key]
        assert error is None and secs > 0 and report["steps"] == 2 and 0.0 <= report["top1"] <= 100.0
        assert (tmp_path / key / "best.pt").is_file()

"""The README's first command, end to end at a tiny size."""
import json

import pytest

from mtkd.cli import main


@pytest.mark.slow
def test_demo_trains_three_roles_side_by_side_and_reuses_the_teacher(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--epochs", "1", "--teacher-epochs", "1",
            "--n-train", "16", "--n-val", "4", "--n-test", "4", "--progress-every", "5"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "training the teacher and the plain student side by side" in first
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["teacher", "plain student", "distilled student"]
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["map50"] <= 1.0 and r["params"] > 0
    assert rows[0]["params"] > rows[1]["params"] == rows[2]["params"]
    # KD minus plain and the gap closed, per metric, and the one-seed caveat
    for metric in ("map50_95", "map50", "miou"):
        assert f"{metric}: distilled - plain = " in first
    assert "One seed (0)" in first and "benchmarks/kd_gain" in first
    assert "distilled student" in (tmp_path / "runs" / "results.md").read_text()
    # the distilled run really had the teacher's terms; each run logged to its own file
    header = (tmp_path / "runs" / "kd" / "results.csv").read_text().splitlines()[0]
    assert "train/seg/soft/seg_kl" in header and "train/det/soft/det_mse" in header
    assert (tmp_path / "runs" / "teacher.log").is_file() and (tmp_path / "runs" / "student.log").is_file()
    stamp = (tmp_path / "runs" / "teacher" / "best.pt").stat().st_mtime_ns
    assert main(args) == 0
    assert "reusing the teacher" in capsys.readouterr().out
    assert (tmp_path / "runs" / "teacher" / "best.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_demo_reports_a_failed_child_run_in_one_line(tmp_path):
    (tmp_path / "data" / "voc").mkdir(parents=True)  # an empty "testbed": the runs cannot start
    with pytest.raises(SystemExit, match=r"\[demo\] the (teacher|plain student) run failed .*\.log"):
        main(["demo", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--progress-every", "1"])


def test_gain_lines_closed_fraction():
    from mtkd.demo import gain_lines

    t = {"map50_95": 0.5, "map50": 0.8, "miou": 0.6}
    p = {"map50_95": 0.3, "map50": 0.4, "miou": 0.6}
    k = {"map50_95": 0.4, "map50": 0.5, "miou": 0.62}
    lines = gain_lines(t, p, k)
    assert "+0.1000 (+50% of the gap" in lines[0]
    assert "+0.1000 (+25% of the gap" in lines[1]
    assert "no teacher lead to close" in lines[2]

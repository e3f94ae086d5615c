"""The README's first command, end to end at a tiny size."""
import json

from mtkd.cli import main


def test_demo_trains_three_roles_and_reuses_the_teacher(tmp_path, capsys):
    args = ["demo", "--out", str(tmp_path / "runs"), "--data", str(tmp_path / "data"), "--epochs", "1",
            "--teacher-epochs", "1", "--n-train", "8", "--n-val", "4", "--n-test", "4"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "first run: training the teacher" in first
    rows = json.loads((tmp_path / "runs" / "results.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["teacher", "plain student", "distilled student"]
    for r in rows:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["map50"] <= 1.0 and r["params"] > 0
    assert rows[0]["params"] > rows[1]["params"] == rows[2]["params"]
    table = (tmp_path / "runs" / "results.md").read_text()
    assert "distilled student" in table and "map50_95" in table
    # the distilled run really had the teacher's terms
    header = (tmp_path / "runs" / "kd" / "results.csv").read_text().splitlines()[0]
    assert "train/seg/soft/seg_kl" in header and "train/det/soft/det_mse" in header
    stamp = (tmp_path / "runs" / "teacher" / "best.pt").stat().st_mtime_ns
    assert main(args + ["--epochs", "1"]) == 0
    assert "reusing the teacher" in capsys.readouterr().out
    assert (tmp_path / "runs" / "teacher" / "best.pt").stat().st_mtime_ns == stamp

"""benchmarks/faults: outcome classes, run comparison, the fault hook, and (slow) one --quick sitting."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_faults", ROOT / "benchmarks" / "faults" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


faults = _load()


def _proc(rc, stderr="", stdout=""):
    return faults.Proc(["mtkd"], rc, stdout, stderr, 1.0)


def test_classify_outcomes() -> None:
    tb = "Traceback (most recent call last):\n  File x\nValueError: boom\n"
    assert faults.classify("fail", _proc(1, tb))[0] == "traceback"
    assert faults.classify("succeed", _proc(0, stdout=tb))[0] == "traceback"
    assert faults.classify("fail", _proc(0))[0] == "silent"
    assert faults.classify("fail", _proc(None))[0] == "timeout"
    # progress bars end with carriage returns: the last line is still the error
    clear = _proc(2, "epoch 1/1:  50%|##   | 1/2\rerror: /d/a.xml: not well-formed\n")
    assert faults.classify("fail", clear) == ("clear", "error: /d/a.xml: not well-formed")
    assert faults.classify("fail", _proc(1, "Ultralytics says no\nsecond line\n"))[0] == "unclear"
    assert faults.classify("fail", clear, problem="the message does not name 'b.xml'")[0] == "unclear"
    assert faults.classify("succeed", _proc(2, "error: train.lr: expected a float\n"))[0] == "unclear"
    assert faults.classify("succeed", _proc(0), problem="read as 151x137")[0] == "silent"
    assert faults.classify("succeed", _proc(0))[0] == "ok"
    sig = _proc(143, "interrupted by SIGTERM; resume with: mtkd train c.yaml --resume\n")
    assert faults.classify("fail", sig, line=r"resume with: .*--resume", exit_code=None)[0] == "clear"
    # a one-line error must exit 2, the CLI's status for it
    assert faults.classify("fail", _proc(1, "error: /d/a.xml: not well-formed\n"))[0] == "unclear"


def test_message_problem_names_leftovers_and_forbidden_words(tmp_path: Path) -> None:
    p = _proc(2, "error: x.pt: cannot read checkpoint (if it is a trusted pickle, set trust_pickle)\n")
    assert faults.message_problem(p, mentions=("x.pt",)) is None
    assert "trust_pickle" in faults.message_problem(p, forbid=("trust_pickle",))
    assert "y.pt" in faults.message_problem(p, mentions=("y.pt",))
    (tmp_path / "proj").mkdir()
    assert "left" in faults.message_problem(p, absent=(tmp_path / "proj",))


def _run_folder(path: Path, w: float, wall: float) -> Path:
    path.mkdir()
    model = {"conv.weight": torch.full((2, 2), w), "bn.num_batches_tracked": torch.tensor(3)}
    torch.save({"model": model, "epoch": 2}, path / "best.pt")
    torch.save({"model": model, "train_state": {"model": model, "optimizer": {"state": {0: {"step": torch.tensor(4.0)}},
                                                                             "param_groups": [{"lr": 0.1}]}}},
               path / "last.pt")
    (path / "test_metrics.json").write_text(json.dumps({"map50": 0.5, "miou": 0.25, "train_wall_s": wall,
                                                        "checkpoint": str(path / "best.pt")}))
    return path


def test_compare_runs_exact_only_when_weights_and_metrics_equal(tmp_path: Path) -> None:
    ref = _run_folder(tmp_path / "ref", 1.0, wall=3.0)
    same = _run_folder(tmp_path / "same", 1.0, wall=9.0)  # clocks and paths are not compared
    assert faults.compare_runs(ref, same) == {"exact": True, "differs": []}
    other = _run_folder(tmp_path / "other", 1.0 + 1e-7, wall=3.0)
    res = faults.compare_runs(ref, other)
    assert not res["exact"]
    assert any(d.startswith("best.pt:model") and "conv.weight" in d for d in res["differs"])
    assert any(d.startswith("last.pt:train_state.model") for d in res["differs"])
    (other / "last.pt").write_bytes(b"torn")
    assert "last.pt: missing or unreadable" in faults.compare_runs(ref, other)["differs"]


def test_plan_kills_spreads_write_kills_over_chains() -> None:
    import random

    plan = faults.plan_kills(31, 11, 3, random.Random(0))
    assert sorted(len(c) for c in plan) == [10, 10, 11]
    assert sum(k == "write" for c in plan for k in c) == 11


def test_kill_loop_moves_the_kills_of_a_chain_that_ended_early_to_a_new_chain(monkeypatch, tmp_path) -> None:
    # A run that finishes before its kill ends the chain; the kills it had left are made in a new
    # chain, so every planned kill happens.
    calls = []

    def fake_chain(ctx, c, kinds, ref, rng, timeout):
        calls.append(list(kinds))
        done = min(len(kinds), 2)  # each chain's run ends before its third kill
        kills = [{"kind": k, "killed": i < done} for i, k in enumerate(kinds[:done + 1])]
        return {"chain": c, "kills": kills, "final": {"rc": 0}, "temps_at_end": [], "exact": True, "differs": []}

    monkeypatch.setattr(faults, "reference_run",
                        lambda ctx: {"out": tmp_path, "seconds": 1.0, "startup_s": 0.5, "train_s": 0.5})
    monkeypatch.setattr(faults, "kill_chain", fake_chain)
    ctx = faults.Ctx(work=tmp_path, data=tmp_path, epochs=2)
    loop = faults.kill_loop(ctx, n=9, n_write=3, chains=2, seed=0, timeout=1.0)
    assert loop["summary"]["tried"] == 9 and loop["summary"]["write_kills"] == 3
    assert [len(k) for k in calls] == [5, 4, 3, 2, 1]
    assert [r["chain"] for r in loop["chains"]] == [0, 1, 2, 3, 4]


def _child(code: str, env: dict) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", code], env=full, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_hook_pauses_inside_an_atomic_checkpoint_write(tmp_path: Path) -> None:
    """kill -9 while paused: the half-written temporary file stays, the old checkpoint is untouched."""
    target, marker = tmp_path / "last.pt", tmp_path / "marker"
    torch.save({"model": {"w": torch.zeros(3)}}, target)
    old = target.read_bytes()
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks/faults'); import hook; "
            f"hook.install_pause(2, {str(marker)!r}); from mtkd.checkpoint import save_atomic; "
            f"save_atomic({{'model': {{'w': torch.ones(3)}}}}, {str(tmp_path / 'best.pt')!r}); "
            f"save_atomic({{'model': {{'w': torch.ones(100000)}}}}, {str(target)!r})")
    proc = _child(code, {})
    t0 = time.monotonic()
    while not marker.exists() and proc.poll() is None and time.monotonic() - t0 < 60:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "best.pt").is_file()  # the first save was not paused
    assert target.read_bytes() == old
    temps = faults.temp_files(tmp_path)
    assert len(temps) == 1 and temps[0].startswith(".last.pt.")
    assert 0 < (tmp_path / temps[0]).stat().st_size < 400000 * 0.6


def test_hook_read_only_folder_refuses_writes_inside_only(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    code = ("import sys, errno, os, tempfile; from pathlib import Path; sys.path.insert(0, 'benchmarks/faults'); "
            f"import hook; hook.install_read_only({str(ro)!r}); "
            f"Path({str(tmp_path / 'ok.txt')!r}).write_text('fine'); "
            "codes = []\n"
            f"for f in (lambda: Path({str(ro / 'a.txt')!r}).write_text('x'), lambda: Path({str(ro / 'sub')!r}).mkdir(), "
            f"          lambda: tempfile.mkstemp(dir={str(ro)!r})):\n"
            "    try: f()\n"
            "    except OSError as e: codes.append(e.errno)\n"
            "print(codes == [errno.EROFS] * 3, os.listdir(" + repr(str(ro)) + "))")
    out, err = _child(code, {}).communicate(timeout=60)
    assert out.strip() == "True []", err
    assert (tmp_path / "ok.txt").read_text() == "fine"


@pytest.mark.slow
def test_quick_sitting_writes_kills_and_inputs(tmp_path: Path) -> None:
    payload = faults.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                           "--cases", "unknown_config_key", "truncated_checkpoint"])
    k, i = payload["kills"], payload["inputs"]
    assert k["tried"] == 3 and k["write_kills"] == 1 and k["in_write"] >= 1
    assert 0 <= k["exact"] <= k["tried"] and k["last_pt_torn"] == 0
    assert i["tried"] == 2 == sum(i[o] for o in faults.OUTCOMES)
    assert {c["id"] for c in payload["cases"]} == {"unknown_config_key", "truncated_checkpoint"}
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["kills"] == k and saved["inputs"] == i
    assert "## Kill loop" in (tmp_path / "out" / "results.md").read_text()

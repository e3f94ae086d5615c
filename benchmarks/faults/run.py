#!/usr/bin/env python
"""Benchmark: does mtkd survive ``kill -9`` and bad input the way issue 17 asks?

Two parts, each run through the command line as a user would (every run is
a fresh ``mtkd`` process; nothing is imported from mtkd into this process
except to read checkpoints and write a few input files):

1. **Kill loop.** A tiny training run (``small/student.yaml`` on a tiny
   ``mtkd make-synthetic`` set, 64 px, batch 4, ``train.workers=0``,
   ``--epochs`` epochs of 2 steps) is trained once uninterrupted (the
   reference), then in ``chains``: each chain starts the same run in its own
   folder, ``kill -9``\\ s it, starts it again with ``--resume`` (or afresh
   while no ``last.pt`` exists), and so on until its planned kills are done;
   then it lets the run finish. Two kinds of kill:

   * ``random``: once the process has reached training (``fit`` has written
     ``config.yaml``), after a uniformly random delay of up to the
     reference's training time for the epochs still to run (loading the
     resume state, steps, validation, saves and the test report);
   * ``write``: inside a checkpoint write. The process runs under
     ``benchmarks/faults/hook.py`` (the same ``mtkd.cli.main``), which
     pauses the 1st or 2nd checkpoint save of the process after half of the
     checkpoint's bytes are in the temporary file; the kill comes then.

   After each kill the run folder is inspected: whether ``last.pt`` loads
   (never torn) and at which epoch, and which temporary files the kill left.
   A chain is ``exact`` when its finished run equals the reference: every
   tensor of ``best.pt`` and ``last.pt`` (evaluated weights, raw weights,
   optimizer state) and every test metric except wall-clock ones
   (:data:`NOT_COMPARED`). Each kill of an exact chain counts as exact.

2. **Bad input.** Every bad input of the README's list and of issue 17
   (:func:`cases`), each as one CLI run in its own folder, classified as

   * ``clear``: should fail, and did: exit status != 0, the last line of
     stderr is the one-line error (``error: ...``; for a signal, the
     ``... resume with: ...`` line), it names what the case requires and
     the run left behind nothing it must not;
   * ``ok``: should work (a valid input that was mishandled before, e.g. a
     16-bit PNG or ``train.lr=1e-3``), and did, with the right output;
   * ``unclear``: exit status != 0 without a traceback, but the message
     misleads, misses the name it should give, comes after files were
     written, or the input should have been accepted;
   * ``traceback``: a Python traceback was printed;
   * ``silent``: exit status 0 where it should fail, or a wrong output;
   * ``timeout``: the run did not end within ``--timeout`` seconds.

Writes ``results.json`` (``{"kills": {"tried", "exact", "in_write", ...},
"inputs": {"tried", "clear", "ok", "unclear", "traceback", "silent",
"timeout"}, "cases": [...], "chains": [...], ...}``) and ``results.md`` into
``--out``. Targets: 0 tracebacks, 0 silent failures, every resume exact.

Full run (about 30 min on 2 busy CPU cores, most of it process start-up)::

    python benchmarks/faults/run.py --out benchmarks/faults

Quick check (3 kills, 6 inputs)::

    python benchmarks/faults/run.py --quick --out /tmp/faults
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import _atomic_write  # noqa: E402

HOOK = Path(__file__).resolve().parent / "hook.py"
TRACEBACK = "Traceback (most recent call last)"
#: Test-report keys that differ between identical runs (clocks, paths).
NOT_COMPARED = ("train_wall_s", "latency_ms", "checkpoint")
#: Temporary files of ``mtkd.checkpoint.save_atomic``: ``.<name>.<8 characters>.tmp``.
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
OUTCOMES = ("clear", "ok", "unclear", "traceback", "silent", "timeout")
#: Overrides of every training run: tiny, CPU, no plots, one process.
TRAIN = ("data.imgsz=64", "train.batch=4", "train.workers=0", "train.device=cpu", "train.plots=false",
         "train.tensorboard=false", "train.val_every=1")
CONFIG = "small/student.yaml"


# -- running the command line -------------------------------------------------------------------
@dataclasses.dataclass
class Proc:
    """A finished CLI run."""
    args: List[str]
    rc: Optional[int]
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of every ``mtkd`` child: this checkout first on the path, one torch thread, offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def mtkd_argv(args: Sequence[str], hooked: bool = False) -> List[str]:
    """``mtkd --offline ARGS`` as a child command line (``python -m mtkd.cli``, or the fault hook)."""
    head = [sys.executable, str(HOOK)] if hooked else [sys.executable, "-m", "mtkd.cli"]
    return head + ["--offline"] + list(args)


def spawn(args: Sequence[str], cwd: Path, env: Optional[Dict[str, str]] = None, hooked: bool = False,
          fsize: Optional[int] = None) -> subprocess.Popen:
    """Start ``mtkd ARGS``; stdout/stderr go to files in ``cwd`` (read by :func:`finish`)."""
    cwd.mkdir(parents=True, exist_ok=True)
    def limit_file_size() -> None:  # writes beyond the limit fail with EFBIG, like on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    preexec = limit_file_size if fsize is not None else None
    out = open(cwd / "stdout.txt", "w")
    err = open(cwd / "stderr.txt", "w")
    try:
        proc = subprocess.Popen(mtkd_argv(args, hooked), cwd=cwd, env=child_env(env), stdout=out, stderr=err,
                                preexec_fn=preexec, start_new_session=True)
    finally:
        out.close()
        err.close()
    proc.t0 = time.monotonic()  # type: ignore[attr-defined]
    proc.log_dir = cwd  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: Optional[float] = None) -> Proc:
    """Wait for ``proc`` (killing it after ``timeout`` s: ``rc`` None) and collect its output."""
    try:
        rc: Optional[int] = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    d: Path = proc.log_dir  # type: ignore[attr-defined]
    return Proc(list(map(str, proc.args)), rc, (d / "stdout.txt").read_text(errors="replace"),
                (d / "stderr.txt").read_text(errors="replace"),
                time.monotonic() - proc.t0)  # type: ignore[attr-defined]


def run_cli(args: Sequence[str], cwd: Path, timeout: float, **kw: Any) -> Proc:
    return finish(spawn(args, cwd, **kw), timeout)


def last_line(text: str) -> str:
    """The last non-empty line of ``text`` (progress bars' carriage returns split lines too)."""
    lines = [s.strip() for s in re.split(r"[\r\n]+", text) if s.strip()]
    return lines[-1] if lines else ""


# -- classification -----------------------------------------------------------------------------
def classify(expect: str, proc: Proc, problem: Optional[str] = None,
             line: str = r"^error: ", exit_code: Optional[int] = 2) -> tuple[str, str]:
    """``(outcome, why)`` of one bad-input run (see the module docstring).

    ``expect`` is ``"fail"`` or ``"succeed"``; ``problem`` is what the case's
    own check found wrong (``None``: nothing); ``line`` the pattern the last
    stderr line of an expected failure must match, and ``exit_code`` its exit
    status (2, the CLI's status for a one-line error; ``None``: any non-zero).
    """
    if proc.rc is None:
        return "timeout", f"did not end in time; last stderr line: {last_line(proc.stderr)[:200]}"
    if TRACEBACK in proc.output:
        return "traceback", f"exit {proc.rc} with a traceback: {last_line(proc.stderr)[:200]}"
    final = last_line(proc.stderr)
    if expect == "fail":
        if proc.rc == 0:
            return "silent", "exit 0" + (f"; {problem}" if problem else "")
        if not re.search(line, final):
            return "unclear", f"exit {proc.rc}, last stderr line is not the one-line error: {final[:200]}"
        if exit_code is not None and proc.rc != exit_code:
            return "unclear", f"exit {proc.rc}, expected {exit_code}: {final[:200]}"
        if problem:
            return "unclear", problem
        return "clear", final[:300]
    if proc.rc != 0:
        return "unclear", f"refused a valid input (exit {proc.rc}): {final[:300]}"
    if problem:
        return "silent", problem
    return "ok", "accepted, output checked"


def message_problem(proc: Proc, mentions: Sequence[str] = (), forbid: Sequence[str] = (),
                    absent: Sequence[Path] = ()) -> Optional[str]:
    """What is wrong with an expected failure's message and leftovers, else ``None``."""
    final = last_line(proc.stderr)
    for m in mentions:
        if m.lower() not in final.lower():
            return f"the message does not name {m!r}: {final[:300]}"
    for m in forbid:
        if m.lower() in final.lower():
            return f"the message says {m!r}: {final[:300]}"
    for p in absent:
        if Path(p).exists():
            return f"left {p} behind before failing: {final[:200]}"
    return None


# -- checkpoints --------------------------------------------------------------------------------
def load_ckpt(path: Path) -> Optional[Dict[str, Any]]:
    """A checkpoint as ``torch.load(weights_only=True)`` reads it, ``None`` when it cannot be read."""
    import torch

    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torn or missing: reported as not intact
        return None
    return ck if isinstance(ck, dict) else None


def _flat(x: Any, prefix: str, out: Dict[str, Any]) -> Dict[str, Any]:
    if isinstance(x, dict):
        for k, v in x.items():
            _flat(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _flat(v, f"{prefix}[{i}]", out)
    else:
        out[prefix] = x
    return out


def tensor_diffs(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Keys at which two nested checkpoint entries differ (tensors compared exactly)."""
    import torch

    fa, fb = _flat(a, prefix, {}), _flat(b, prefix, {})
    diffs = [k for k in sorted(set(fa) ^ set(fb))]
    for k in sorted(set(fa) & set(fb)):
        x, y = fa[k], fb[k]
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                diffs.append(k)
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            diffs.append(k)
    return diffs


def compare_runs(ref: Path, run: Path) -> Dict[str, Any]:
    """Is run folder ``run`` the same training result as ``ref``? ``{"exact", "differs": [...]}``.

    Compares ``best.pt``'s ``model``, ``last.pt``'s ``model`` and
    ``train_state.model``/``optimizer``, and ``test_metrics.json`` except
    :data:`NOT_COMPARED`.
    """
    differs: List[str] = []
    for name, keys in (("best.pt", ("model",)), ("last.pt", ("model", "train_state.model",
                                                            "train_state.optimizer"))):
        a, b = load_ckpt(ref / name), load_ckpt(run / name)
        if a is None or b is None:
            differs.append(f"{name}: {'missing or unreadable'}")
            continue
        for key in keys:
            va, vb = a, b
            for part in key.split("."):
                va, vb = (va or {}).get(part), (vb or {}).get(part)
            d = tensor_diffs(va, vb)
            if d:
                differs.append(f"{name}:{key} ({len(d)} entries, first {d[0]})")
    try:
        ma = json.loads((ref / "test_metrics.json").read_text())
        mb = json.loads((run / "test_metrics.json").read_text())
    except (OSError, ValueError):
        differs.append("test_metrics.json: missing or unreadable")
    else:
        for k in sorted(set(ma) | set(mb)):
            if k not in NOT_COMPARED and ma.get(k) != mb.get(k):
                differs.append(f"test_metrics.json:{k} ({ma.get(k)} vs {mb.get(k)})")
    return {"exact": not differs, "differs": differs}


def temp_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_NAME.match(p.name)) if folder.is_dir() else []


def ckpt_position(path: Path) -> Optional[Dict[str, int]]:
    ck = load_ckpt(path)
    if ck is None:
        return None
    return {"epoch": int(ck.get("epoch", -1)), "step": int(ck.get("step", -1))}


# -- the kill loop ------------------------------------------------------------------------------
def train_args(data_root: Path, out: Path, epochs: int, extra: Sequence[str] = ()) -> List[str]:
    return ["train", CONFIG, f"data.root={data_root}", f"out={out}", f"train.epochs={epochs}", "seed=0",
            *TRAIN, *extra]


def reference_run(ctx: "Ctx") -> Dict[str, Any]:
    """The uninterrupted run; also measures start-up and training seconds for the kill timing."""
    out = ctx.work / "kill" / "reference"
    shutil.rmtree(out, ignore_errors=True)
    proc = spawn(train_args(ctx.voc, out, ctx.epochs), ctx.work / "kill" / "reference_log")
    started = None
    while proc.poll() is None:
        if started is None and (out / "config.yaml").exists():
            started = time.monotonic() - proc.t0  # type: ignore[attr-defined]
        time.sleep(0.05)
    res = finish(proc)
    if res.rc != 0:
        raise SystemExit(f"faults: the reference run failed (exit {res.rc}): {last_line(res.stderr)}")
    startup = started if started is not None else res.seconds / 2
    return {"out": out, "seconds": res.seconds, "startup_s": startup, "train_s": max(res.seconds - startup, 1.0)}


def fit_started(out: Path, since: float) -> bool:
    """Has a run started after ``since`` (wall clock) reached training? (``fit`` writes config.yaml first.)"""
    try:
        return (out / "config.yaml").stat().st_mtime >= since - 1.0
    except OSError:
        return False


def plan_kills(n: int, n_write: int, chains: int, rng: random.Random) -> List[List[str]]:
    """``chains`` lists of kill kinds (``random``/``write``), ``n`` kills in all, ``n_write`` of them writes."""
    kinds = ["write"] * n_write + ["random"] * (n - n_write)
    rng.shuffle(kinds)
    return [kinds[i::chains] for i in range(chains)]


def kill_chain(ctx: "Ctx", c: int, kinds: Sequence[str], ref: Dict[str, Any], rng: random.Random,
               timeout: float) -> Dict[str, Any]:
    """One chain: kill the run once per entry of ``kinds``, resuming after each, then let it finish."""
    out = ctx.work / "kill" / f"chain{c}"
    shutil.rmtree(out, ignore_errors=True)
    kills: List[Dict[str, Any]] = []
    for i, kind in enumerate(kinds):
        before = ckpt_position(out / "last.pt")
        resume = ["--resume"] if before is not None else []
        marker = ctx.work / "kill" / f"chain{c}_marker"
        marker.unlink(missing_ok=True)
        temps_before = set(temp_files(out))
        env, hooked, pause = None, False, None
        if kind == "write":
            pause = rng.choice((1, 2))
            env, hooked = {"MTKD_FAULTS_PAUSE_SAVE": str(pause), "MTKD_FAULTS_MARKER": str(marker)}, True
        remaining = 1.0 - (before["epoch"] / ctx.epochs if before else 0.0)
        delay = rng.uniform(0.0, ref["train_s"] * max(remaining, 0.1))
        wall0 = time.time()
        proc = spawn(train_args(ctx.voc, out, ctx.epochs) + resume, ctx.work / "kill" / f"chain{c}_log{i}",
                     env=env, hooked=hooked)
        t0, started = proc.t0, None  # type: ignore[attr-defined]
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if kind == "write":
                if marker.exists():
                    break
            elif started is None:
                if fit_started(out, wall0):
                    started = time.monotonic()
            elif time.monotonic() - started >= delay:
                break
            time.sleep(0.01)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
        res = finish(proc)
        rec: Dict[str, Any] = {"chain": c, "kill": i + 1, "kind": kind, "resumed": bool(resume),
                               "resumed_from": before, "at_s": round(res.seconds, 2)}
        if kind == "random":
            rec["after_start_s"] = round(delay, 2)
        if kind == "write":
            rec["pause_in_save"] = pause
            rec["paused"] = marker.exists()
        if not alive:  # ended before the kill: the chain is over
            rec.update(killed=False, rc=res.rc, error=last_line(res.stderr)[:300])
            kills.append(rec)
            break
        last = out / "last.pt"
        rec.update(killed=True, last_pt_intact=(ckpt_position(last) is not None) if last.exists() else None,
                   last_pt=ckpt_position(last), temps_left=temp_files(out))
        rec["in_write"] = bool(set(rec["temps_left"]) - temps_before)
        kills.append(rec)
    final = None
    if not kills or kills[-1]["killed"]:
        resume = ["--resume"] if (out / "last.pt").exists() else []
        res = finish(spawn(train_args(ctx.voc, out, ctx.epochs) + resume, ctx.work / "kill" / f"chain{c}_final"),
                     timeout)
        final = {"rc": res.rc, "error": None if res.rc == 0 else last_line(res.stderr)[:300],
                 "traceback": TRACEBACK in res.output}
    else:
        final = {"rc": kills[-1]["rc"], "error": kills[-1]["error"], "traceback": False}
    cmp = compare_runs(ref["out"], out) if final["rc"] == 0 else {"exact": False, "differs": ["run failed"]}
    return {"chain": c, "kills": kills, "final": final, "temps_at_end": temp_files(out), **cmp}


def kill_loop(ctx: "Ctx", n: int, n_write: int, chains: int, seed: int, timeout: float) -> Dict[str, Any]:
    rng = random.Random(seed)
    print(f"[faults] reference run ({ctx.epochs} epochs) ...", flush=True)
    ref = reference_run(ctx)
    print(f"[faults] reference: {ref['seconds']:.1f} s ({ref['startup_s']:.1f} s start-up)", flush=True)
    ctx.ckpt = ref["out"] / "best.pt"
    results: List[Dict[str, Any]] = []
    queue = [kinds for kinds in (plan_kills(n, n_write, chains, rng) if n else [])]
    # A run that ends before its kill (a late random delay, or no save left to pause) ends its
    # chain, which is then compared with the reference; the kills it had left go to a new chain,
    # so every planned kill is made. Bounded: at most 3x the planned chains.
    while queue and len(results) < 3 * max(chains, 1):
        kinds = queue.pop(0)
        r = kill_chain(ctx, len(results), kinds, ref, rng, timeout)
        done = sum(k["killed"] for k in r["kills"])
        print(f"[faults] chain {r['chain']}: {done} kills, exact={r['exact']} {'; '.join(r['differs'][:2])}",
              flush=True)
        results.append(r)
        if done < len(kinds):
            queue.append(list(kinds[done:]))
    kills = [k for r in results for k in r["kills"] if k["killed"]]
    summary = {
        "tried": len(kills),
        "exact": sum(len([k for k in r["kills"] if k["killed"]]) for r in results if r["exact"]),
        "in_write": sum(bool(k.get("in_write")) for k in kills),
        "write_kills": sum(k["kind"] == "write" for k in kills),
        "last_pt_torn": sum(k.get("last_pt_intact") is False for k in kills),
        "temps_left_at_end": sum(len(r["temps_at_end"]) for r in results),
        "chains": len(results), "chains_exact": sum(r["exact"] for r in results),
        "reference_s": round(ref["seconds"], 1), "startup_s": round(ref["startup_s"], 1),
    }
    return {"summary": summary, "chains": results}


# -- bad inputs ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Ctx:
    """Shared inputs of the benchmark: the work folder, the tiny data set and a trained checkpoint."""
    work: Path
    data: Path
    epochs: int
    ckpt: Optional[Path] = None

    @property
    def voc(self) -> Path:
        return self.data / "voc"

    @property
    def yolo(self) -> Path:
        return self.data / "yolo" / "data.yaml"

    @property
    def classes(self) -> List[str]:
        return (self.voc / "classes.txt").read_text().split()


@dataclasses.dataclass
class Run:
    """What one case runs and how it is judged."""
    args: List[str]
    expect: str = "fail"
    mentions: Sequence[str] = ()
    forbid: Sequence[str] = ()
    absent: Sequence[Path] = ()
    check: Optional[Callable[[Proc], Optional[str]]] = None
    env: Optional[Dict[str, str]] = None
    hooked: bool = False
    fsize: Optional[int] = None
    send: Optional[int] = None  # a signal sent once training has started
    line: str = r"^error: "
    exit_code: Optional[int] = 2  # of an expected failure; None: any non-zero (the case's check judges it)


@dataclasses.dataclass
class Case:
    id: str
    source: str
    what: str
    build: Callable[[Ctx, Path], Run]
    quick: bool = False
    needs: str = "voc"


def _train(ctx: Ctx, d: Path, root: Optional[Path] = None, *extra: str, config: str = CONFIG) -> List[str]:
    return ["train", config, f"data.root={root or ctx.voc}", f"out={d / 'run'}", "train.epochs=1", *TRAIN,
            *extra]


def _voc_copy(ctx: Ctx, d: Path) -> Path:
    dst = d / "voc"
    shutil.copytree(ctx.voc, dst)
    return dst


def _first(voc: Path, split: str = "train") -> str:
    return (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[0]


def _edit_xml(voc: Path, stem: str, fn: Callable[[Any], None]) -> Path:
    import xml.etree.ElementTree as ET

    path = voc / "Annotations" / f"{stem}.xml"
    tree = ET.parse(path)
    fn(tree.getroot())
    tree.write(path)
    return path


def _random_ckpt(path: Path, preset: str, classes: Sequence[str], fill: Optional[float] = None) -> Path:
    import torch

    from benchmarks.common import random_checkpoint

    random_checkpoint(path, {"preset": preset}, list(classes))
    if fill is not None:
        ck = torch.load(path, weights_only=True)
        for v in ck["model"].values():
            if v.is_floating_point():
                v.fill_(fill)
        torch.save(ck, path)
    return path


def _images(d: Path, ctx: Ctx) -> Dict[str, Any]:
    """Two non-square RGB test images of the data set as uint8 arrays."""
    import numpy as np
    from PIL import Image

    found = []
    for p in sorted((ctx.voc / "JPEGImages").glob("*.jpg")):
        a = np.asarray(Image.open(p).convert("RGB"))
        if a.shape[0] != a.shape[1]:
            found.append(a)
        if len(found) == 2:
            break
    if not found:
        raise SystemExit("faults: the data set has no non-square image (EXIF cases need one)")
    return {"rgb": found[0]}


def _predict(ctx: Ctx, d: Path, source: Path, *extra: str) -> List[str]:
    return ["predict", CONFIG, *TRAIN, *extra, "--ckpt", str(ctx.ckpt), "--source", str(source),
            "--out", str(d / "pred")]


def _detections(d: Path) -> Optional[List[Dict[str, Any]]]:
    try:
        return json.loads((d / "pred" / "detections.json").read_text())
    except (OSError, ValueError):
        return None


def _vis_diff(d: Path, a: str, b: str) -> Optional[float]:
    """Mean absolute pixel difference of two prediction drawings (``None`` when one is missing)."""
    import numpy as np
    from PIL import Image

    pa, pb = d / "pred" / "vis" / a, d / "pred" / "vis" / b
    if not (pa.is_file() and pb.is_file()):
        return None
    x = np.asarray(Image.open(pa).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(pb).convert("RGB"), dtype=np.float64)
    return float(np.abs(x - y).mean()) if x.shape == y.shape else float("inf")


def case_image_modes(ctx: Ctx, d: Path) -> Run:
    """16-bit, grayscale, RGBA and palette images predict like their 8-bit RGB versions."""
    import cv2
    import numpy as np
    from PIL import Image

    rgb = _images(d, ctx)["rgb"]
    src = d / "images"
    src.mkdir(parents=True)
    Image.fromarray(rgb).save(src / "rgb.png")
    cv2.imwrite(str(src / "rgb16.png"), (rgb[..., ::-1].astype(np.uint16) * 257))
    gray = Image.fromarray(rgb).convert("L")
    gray.save(src / "gray.png")
    gray.convert("RGB").save(src / "gray_rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(src / "rgba.png")
    pal = Image.fromarray(rgb).quantize(64)
    pal.save(src / "palette.png")
    pal.convert("RGB").save(src / "palette_rgb.png")

    def check(proc: Proc) -> Optional[str]:
        bad = []
        for name, ref in (("rgb16.png", "rgb.png"), ("gray.png", "gray_rgb.png"), ("rgba.png", "rgb.png"),
                          ("palette.png", "palette_rgb.png")):
            diff = _vis_diff(d, name, ref)
            if diff is None or diff > 1.0:
                bad.append(f"{name} read unlike {ref} (mean |diff| {diff})")
        return "; ".join(bad) or None

    return Run(_predict(ctx, d, src), expect="succeed", check=check)


def case_float_image(ctx: Ctx, d: Path) -> Run:
    import numpy as np
    from PIL import Image

    rgb = _images(d, ctx)["rgb"]
    (d / "images").mkdir(parents=True)
    path = d / "images" / "float.tif"
    Image.fromarray(rgb[..., 0].astype(np.float32) / 255.0, mode="F").save(path)
    return Run(_predict(ctx, d, path), mentions=("float.tif",), forbid=("folder not found",))


def _exif_rotated(rgb: Any, path: Path) -> None:
    """Save ``rgb`` as a JPEG whose pixels are stored rotated, with the EXIF orientation that undoes it."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # displayed = stored rotated 90 degrees clockwise
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def case_exif_predict(ctx: Ctx, d: Path) -> Run:
    rgb = _images(d, ctx)["rgb"]
    (d / "images").mkdir(parents=True)
    _exif_rotated(rgb, d / "images" / "rot.jpg")
    h, w = rgb.shape[:2]

    def check(proc: Proc) -> Optional[str]:
        det = _detections(d)
        if not det:
            return "no detections.json"
        got = (det[0]["height"], det[0]["width"])
        return None if got == (h, w) else f"read as {got[0]}x{got[1]} (h x w), displayed {h}x{w}"

    return Run(_predict(ctx, d, d / "images"), expect="succeed", check=check)


def case_exif_voc(ctx: Ctx, d: Path) -> Run:
    import numpy as np
    from PIL import Image

    voc = _voc_copy(ctx, d)
    for stem in (voc / "ImageSets" / "Main" / "train.txt").read_text().split():
        img = voc / "JPEGImages" / f"{stem}.jpg"
        rgb = np.asarray(Image.open(img).convert("RGB"))
        if rgb.shape[0] != rgb.shape[1]:
            _exif_rotated(rgb, img)
            break
    return Run(_train(ctx, d, voc), expect="succeed")


def _yolo_copy(ctx: Ctx, d: Path) -> Path:
    """A copy of the YOLO tree whose data.yaml points at the copy (the original's ``path:`` is absolute)."""
    root = d / "yolo"
    shutil.copytree(ctx.data / "yolo", root)
    data = yaml.safe_load((root / "data.yaml").read_text())
    (root / "data.yaml").write_text(yaml.safe_dump(dict(data, path=str(root)), sort_keys=False))
    return root


def case_exif_yolo(ctx: Ctx, d: Path) -> Run:
    """A training image with a YOLO label and no mask, stored turned with an EXIF tag that turns it back:
    training succeeds, and the dataset reads it as displayed (the stored pixels turned back)."""
    import numpy as np
    from PIL import Image

    root = _yolo_copy(ctx, d)
    label = [t for t in sorted((root / "labels").rglob("*.txt")) if "train" in str(t) and t.read_text().strip()][0]
    image = next(p for p in (root / "images" / "train").iterdir() if p.stem == label.stem)
    rgb = np.asarray(Image.open(image).convert("RGB"))
    mask = root / "masks" / "train" / f"{label.stem}.png"
    if mask.exists():
        mask.unlink()
    jpg = image.with_suffix(".jpg")
    if jpg != image:
        image.unlink()
    _exif_rotated(rgb, jpg)

    def check(proc: Proc) -> Optional[str]:
        from mtkd.datasets import YOLODataset

        ds = YOLODataset(root / "data.yaml", "train")
        k = [r.id for r in ds.records].index(label.stem)
        got = ds.load_sample(k).image.astype(np.float64)
        if got.shape != rgb.shape:
            return f"read as {got.shape[0]}x{got.shape[1]} (h x w), displayed {rgb.shape[0]}x{rgb.shape[1]}"
        upright = float(np.abs(got - rgb).mean())
        turned = np.rot90(rgb)  # the stored pixels, when h == w
        stored = float(np.abs(got - turned).mean()) if turned.shape == rgb.shape else float("inf")
        return None if upright < stored else f"read as stored (diff to displayed {upright:.1f}, to stored {stored:.1f})"

    return Run(_train(ctx, d, root / "data.yaml", "data.format=yolo"), expect="succeed", check=check)


def case_predict_file(ctx: Ctx, d: Path) -> Run:
    stem = _first(ctx.voc, "test")
    src = ctx.voc / "JPEGImages" / f"{stem}.jpg"

    def check(proc: Proc) -> Optional[str]:
        det = _detections(d)
        return None if det is not None and len(det) == 1 else f"detections.json: {det!r:.100}"

    return Run(_predict(ctx, d, src), expect="succeed", check=check)


def case_corrupt_image(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    (voc / "JPEGImages" / f"{stem}.jpg").write_bytes(b"not an image at all")
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.jpg",), forbid=("pi_heif",))


def case_truncated_image(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    p = voc / "JPEGImages" / f"{stem}.jpg"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.jpg",), forbid=("pi_heif",))


def case_text_as_image(ctx: Ctx, d: Path) -> Run:
    (d / "images").mkdir(parents=True)
    host = d / "images" / "hostname.jpg"
    host.write_text(Path("/etc/hostname").read_text() if Path("/etc/hostname").is_file() else "localhost\n")
    return Run(_predict(ctx, d, d / "images"), mentions=("hostname.jpg",), forbid=("pi_heif", "heif"))


def case_missing_root(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d, d / "no_such_dataset"), mentions=("no_such_dataset",))


def case_missing_image(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    (voc / "JPEGImages" / f"{stem}.jpg").unlink()
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.jpg",))


def case_missing_mask(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    (voc / "SegmentationClass" / f"{stem}.png").unlink()
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.png",))


def case_malformed_xml(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    (voc / "Annotations" / f"{stem}.xml").write_text("<annotation><object><name>")
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.xml",))


def case_malformed_xml_skip(ctx: Ctx, d: Path) -> Run:
    """``data.skip_bad`` with a truncated XML while the class list is read from the XMLs."""
    voc = _voc_copy(ctx, d)
    (voc / "classes.txt").unlink()
    stem = _first(voc)
    (voc / "Annotations" / f"{stem}.xml").write_text("<annotation><object><name>")

    def check(proc: Proc) -> Optional[str]:
        try:
            tm = json.loads((d / "run" / "test_metrics.json").read_text())
        except (OSError, ValueError):
            return "no test_metrics.json"
        counts = {k: v for k, v in tm.items() if "skip" in k and k != "skipped_steps"}
        if not any(isinstance(v, (int, float)) and v >= 1 for v in counts.values()):
            return f"test_metrics.json reports no skipped sample ({counts or 'no skip key'})"
        if f"{stem}.xml" not in proc.output:
            return f"no warning names {stem}.xml"
        return None

    return Run(_train(ctx, d, voc, "data.skip_bad=true"), expect="succeed", check=check)


def case_predict_skip_bad(ctx: Ctx, d: Path) -> Run:
    src = d / "images"
    src.mkdir(parents=True)
    for stem in (ctx.voc / "ImageSets" / "Main" / "test.txt").read_text().split()[:2]:
        shutil.copy(ctx.voc / "JPEGImages" / f"{stem}.jpg", src)
    (src / "broken.jpg").write_bytes(b"\xff\xd8 broken")

    def check(proc: Proc) -> Optional[str]:
        det = _detections(d)
        if det is None:
            return "no detections.json"
        return None if len(det) == 2 else f"detections.json has {len(det)} entries, expected 2"

    return Run(_predict(ctx, d, src, "data.skip_bad=true"), expect="succeed", check=check)


def _set_box(field: str, value: Callable[[int, int], int]) -> Callable[[Any], None]:
    def edit(root: Any) -> None:
        w, h = int(root.find("size/width").text), int(root.find("size/height").text)
        box = root.find("object/bndbox")
        box.find(field).text = str(value(w, h))
    return edit


def case_box_outside(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    _edit_xml(voc, stem, _set_box("xmax", lambda w, h: w + 10))
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.xml",))


def case_zero_box(ctx: Ctx, d: Path) -> Run:
    """VOC corners are 1-based and inclusive (``xmin == xmax`` is a box 1 px wide), so a box of
    zero width has ``xmax = xmin - 1``."""
    voc = _voc_copy(ctx, d)
    stem = _first(voc)

    def edit(root: Any) -> None:
        box = root.find("object/bndbox")
        box.find("xmax").text = str(int(float(box.find("xmin").text)) - 1)
    _edit_xml(voc, stem, edit)
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.xml",))


def case_unknown_class(ctx: Ctx, d: Path) -> Run:
    voc = _voc_copy(ctx, d)
    stem = _first(voc)
    _edit_xml(voc, stem, lambda root: setattr(root.find("object/name"), "text", "zebra"))
    return Run(_train(ctx, d, voc), mentions=(f"{stem}.xml", "zebra"))


def case_new_class_no_list(ctx: Ctx, d: Path) -> Run:
    """Without classes.txt an unknown name becomes a class: the run must say so and record the list."""
    voc = _voc_copy(ctx, d)
    (voc / "classes.txt").unlink()
    _edit_xml(voc, _first(voc), lambda root: setattr(root.find("object/name"), "text", "zebra"))

    def check(proc: Proc) -> Optional[str]:
        if "zebra" not in proc.output:
            return "the class list read from the data (with 'zebra') is not printed"
        texts = [p for p in (d / "run").glob("*") if p.is_file() and p.suffix in (".txt", ".json", ".yaml")
                 and "zebra" in p.read_text(errors="replace")]
        return None if texts else "no text file of the run folder records the class list"

    return Run(_train(ctx, d, voc), expect="succeed", check=check)


def case_class_count(ctx: Ctx, d: Path) -> Run:
    ck = _random_ckpt(d / "teacher3.pt", "student_small", ["a", "b", "c"])
    return Run(_train(ctx, d, None, f"teacher.ckpt={ck}", config="small/kd.yaml"), mentions=("teacher3.pt",))


def case_unknown_key(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d, None, "train.lrr=0.1"), mentions=("train.lrr",))


def case_bad_value_type(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d, None, "train.epochs=many"), mentions=("train.epochs",))


def case_sci_notation(ctx: Ctx, d: Path) -> Run:
    def check(proc: Proc) -> Optional[str]:
        cfg = (d / "run" / "config.yaml")
        return None if cfg.is_file() else "no config.yaml"

    return Run(_train(ctx, d, None, "train.lr=1e-3"), expect="succeed", check=check)


def case_malformed_yaml(ctx: Ctx, d: Path) -> Run:
    d.mkdir(parents=True, exist_ok=True)
    cfg = d / "bad.yaml"
    cfg.write_text("_base_: small/student.yaml\ntrain: [epochs: 1\n")
    args = _train(ctx, d)
    args[1] = str(cfg)
    return Run(args, mentions=("bad.yaml",))


def case_missing_config(ctx: Ctx, d: Path) -> Run:
    args = _train(ctx, d)
    args[1] = str(d / "nope.yaml")
    return Run(args, mentions=("nope.yaml",))


def case_duplicate_label(ctx: Ctx, d: Path) -> Run:
    ck = _random_ckpt(d / "teacher.pt", "student_small", ctx.classes)
    return Run(_train(ctx, d, None, f"teacher.ckpt={ck}", "teacher.model.preset=student_small",
                      "loss.extra=[{name: cwd, weight: 1.0}, {name: cwd, weight: 2.0}]", config="small/kd.yaml"),
               mentions=("loss.extra[1]",))


def case_malformed_json(ctx: Ctx, d: Path) -> Run:
    coco = d / "coco"
    shutil.copytree(ctx.data / "coco", coco)
    ann = sorted((coco / "annotations").glob("*train*.json"))[0]
    ann.write_text(ann.read_text()[:200])
    return Run(_train(ctx, d, coco, "data.format=coco"), mentions=(ann.name,))


def _coco_file_name(ctx: Ctx, d: Path, name: Callable[[Path], str]) -> Run:
    coco = d / "coco"
    shutil.copytree(ctx.data / "coco", coco)
    ann = sorted((coco / "annotations").glob("*train*.json"))[0]
    js = json.loads(ann.read_text())
    outside = d / "outside.jpg"
    img_dir = next(p for p in (coco / "images").rglob("*.jpg"))
    shutil.copy(img_dir, outside)
    js["images"][0]["file_name"] = name(outside)
    ann.write_text(json.dumps(js))
    return Run(_train(ctx, d, coco, "data.format=coco"), mentions=(ann.name,))


def case_coco_escape(ctx: Ctx, d: Path) -> Run:
    return _coco_file_name(ctx, d, lambda p: "../../../outside.jpg")


def case_coco_absolute(ctx: Ctx, d: Path) -> Run:
    return _coco_file_name(ctx, d, lambda p: str(p))


def case_yolo_bad_class(ctx: Ctx, d: Path) -> Run:
    root = _yolo_copy(ctx, d)
    txt = sorted((root / "labels").rglob("*.txt"))
    txt = [t for t in txt if "train" in str(t) and t.read_text().strip()][0]
    txt.write_text("99 0.5 0.5 0.2 0.2\n")
    return Run(_train(ctx, d, root / "data.yaml", "data.format=yolo"), mentions=(txt.name,))


def case_yolo_bad_yaml(ctx: Ctx, d: Path) -> Run:
    root = d / "yolo"
    shutil.copytree(ctx.data / "yolo", root)
    (root / "data.yaml").write_text("names: [a, b\npath: .\n")
    return Run(_train(ctx, d, root / "data.yaml", "data.format=yolo"), mentions=("data.yaml",))


def case_pickled_teacher(ctx: Ctx, d: Path) -> Run:
    import torch

    d.mkdir(parents=True, exist_ok=True)
    path = d / "pickled.pt"
    torch.save({"model": torch.nn.Conv2d(3, 3, 1)}, path)
    return Run(_train(ctx, d, None, f"teacher.ckpt={path}", config="small/kd.yaml"),
               mentions=("pickled.pt", "trust_pickle"))


def case_missing_ckpt(ctx: Ctx, d: Path) -> Run:
    return Run(["eval", CONFIG, f"data.root={ctx.voc}", *TRAIN, "--ckpt", str(d / "nope.pt")],
               mentions=("nope.pt",))


def case_truncated_ckpt(ctx: Ctx, d: Path) -> Run:
    d.mkdir(parents=True, exist_ok=True)
    path = d / "torn.pt"
    data = ctx.ckpt.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Run(["eval", CONFIG, f"data.root={ctx.voc}", *TRAIN, "--ckpt", str(path)],
               mentions=("torn.pt",), forbid=("trust_pickle",))


def case_state_dict_mismatch(ctx: Ctx, d: Path) -> Run:
    return Run(["eval", CONFIG, f"data.root={ctx.voc}", *TRAIN, "model.preset=teacher_small",
                "--ckpt", str(ctx.ckpt)], mentions=("student_small", "teacher_small"))


def case_missing_pretrained(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d, None, f"model.pretrained={d / 'enc.pt'}"), mentions=("enc.pt",))


def case_unlabeled_no_teacher(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d, None, f"data.unlabeled={ctx.voc / 'JPEGImages'}"), mentions=("data.unlabeled",))


def case_split_recorded(ctx: Ctx, d: Path) -> Run:
    out = d / "m.json"

    def check(proc: Proc) -> Optional[str]:
        try:
            m = json.loads(out.read_text())
        except (OSError, ValueError):
            return "no metrics JSON"
        reads = {k: v for k, v in m.items() if "split" in k}
        return None if "val" in reads.values() else f"the split read (val) is not recorded: {reads}"

    return Run(["eval", CONFIG, f"data.root={ctx.voc}", *TRAIN, "data.test=val", "--ckpt", str(ctx.ckpt),
                "--split", "test", "--json", str(out)], expect="succeed", check=check)


def _inf_teacher(ctx: Ctx, d: Path, mode: str) -> List[str]:
    ck = _random_ckpt(d / "inf_teacher.pt", "student_small", ctx.classes, fill=float("inf"))
    return _train(ctx, d, None, f"teacher.ckpt={ck}", "teacher.model.preset=student_small",
                  f"train.nonfinite={mode}", config="small/kd.yaml")


def case_nonfinite_stop(ctx: Ctx, d: Path) -> Run:
    return Run(_inf_teacher(ctx, d, "stop"), mentions=("step",))


def case_nonfinite_all_skipped(ctx: Ctx, d: Path) -> Run:
    return Run(_inf_teacher(ctx, d, "skip"), absent=(d / "run" / "test_metrics.json",))


def case_time_budget(ctx: Ctx, d: Path) -> Run:
    def check(proc: Proc) -> Optional[str]:
        try:
            tm = json.loads((d / "run" / "test_metrics.json").read_text())
        except (OSError, ValueError):
            return "no test_metrics.json"
        if tm.get("stop_reason") != "time_budget":
            return f"stop_reason {tm.get('stop_reason')!r}, expected 'time_budget'"
        if "time budget" not in proc.stdout:
            return "the run does not say it stopped on the time budget"
        return None

    args = _train(ctx, d, None, "train.time_budget_s=0.5")
    args[args.index("train.epochs=1")] = "train.epochs=50"
    return Run(args, expect="succeed", check=check)


def case_disk_full(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d), fsize=1_000_000, mentions=(".pt",))


def case_read_only_train(ctx: Ctx, d: Path) -> Run:
    return Run(_train(ctx, d), env={"MTKD_FAULTS_READ_ONLY": str(d / "run")}, hooked=True,
               mentions=(str(d / "run"),))


def case_read_only_predict(ctx: Ctx, d: Path) -> Run:
    src = ctx.voc / "JPEGImages"
    return Run(_predict(ctx, d, src), env={"MTKD_FAULTS_READ_ONLY": str(d / "pred")}, hooked=True,
               mentions=(str(d / "pred"),))


def _signal_case(sig: int) -> Callable[[Ctx, Path], Run]:
    def build(ctx: Ctx, d: Path) -> Run:
        args = _train(ctx, d)
        args[args.index("train.epochs=1")] = "train.epochs=200"

        def check(proc: Proc) -> Optional[str]:
            if proc.rc != 128 + sig:
                return f"exit {proc.rc}, expected {128 + sig}"
            if ckpt_position(d / "run" / "last.pt") is None:
                return "no readable last.pt"
            return None

        return Run(args, send=sig, check=check, line=r"resume with: .*--resume", exit_code=None)
    return build


def _yolo(ctx: Ctx, d: Path, *kv: str, teacher: Optional[Path] = None, model: str = "yolov8n.yaml",
          data: Optional[Path] = None) -> List[str]:
    return ["yolo", "train", f"model={model}", f"teacher={teacher or ctx.ckpt}", f"data={data or ctx.yolo}",
            "epochs=1", "imgsz=64", "batch=4", "workers=0", "device=cpu", "plots=False",
            f"project={d / 'proj'}", "name=run", *kv]


def case_yolo_missing_model(ctx: Ctx, d: Path) -> Run:
    return Run(_yolo(ctx, d, model="yolov8n.pt"), mentions=("yolov8n.pt",), absent=(d / "proj",))


def case_yolo_missing_data(ctx: Ctx, d: Path) -> Run:
    return Run(_yolo(ctx, d, data=d / "nope.yaml"), mentions=("nope.yaml",), absent=(d / "proj",))


def case_yolo_teacher_dir(ctx: Ctx, d: Path) -> Run:
    (d / "tdir").mkdir(parents=True)
    return Run(_yolo(ctx, d, teacher=d / "tdir"), mentions=("tdir",), forbid=("not found",))


def case_yolo_teacher_yaml(ctx: Ctx, d: Path) -> Run:
    return Run(_yolo(ctx, d, teacher=ctx.yolo), mentions=("data.yaml",), absent=(d / "proj",))


def case_yolo_kd_t0(ctx: Ctx, d: Path) -> Run:
    return Run(_yolo(ctx, d, "kd_t=0"), mentions=("kd_t",), absent=(d / "proj",))


def case_yolo_kd_negative(ctx: Ctx, d: Path) -> Run:
    return Run(_yolo(ctx, d, "kd_cls=-1"), mentions=("kd_cls",), absent=(d / "proj",))


def case_yolo_names(ctx: Ctx, d: Path) -> Run:
    ck = _random_ckpt(d / "renamed.pt", "student_small", list(reversed(ctx.classes)))
    return Run(_yolo(ctx, d, teacher=ck), mentions=("kd_names_ok",), absent=(d / "proj",))


def case_yolo_seg_teacher(ctx: Ctx, d: Path) -> Run:
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    d.mkdir(parents=True, exist_ok=True)
    path = d / "yolov8n-seg.pt"
    torch.save({"model": SegmentationModel("yolov8n-seg.yaml", nc=len(ctx.classes), verbose=False),
                "train_args": {}}, path)
    return Run(_yolo(ctx, d, teacher=path), mentions=("yolov8n-seg.pt", "segment"), absent=(d / "proj",))


def case_tiny_imgsz(ctx: Ctx, d: Path) -> Run:
    args = _train(ctx, d)
    args[args.index("data.imgsz=64")] = "data.imgsz=32"
    return Run(args, mentions=("data.imgsz",))


README = "README bad-input list"
ISSUE = "issue 17"
FOUND = "found here"


def cases() -> List[Case]:
    """Every bad input of the README's list and of issue 17 (``quick``: the ``--quick`` subset)."""
    return [
        Case("missing_data_root", README, "data.root does not exist", case_missing_root, quick=True),
        Case("missing_image", README, "a listed image file is missing", case_missing_image),
        Case("missing_mask", README, "a listed VOC mask file is missing", case_missing_mask),
        Case("corrupt_image", README, "an image file holds no image", case_corrupt_image, quick=True),
        Case("truncated_image", README, "a JPEG cut to a third", case_truncated_image),
        Case("malformed_xml", README, "a VOC XML cut short", case_malformed_xml),
        Case("malformed_json", README, "a COCO annotation JSON cut short", case_malformed_json, needs="coco"),
        Case("malformed_config_yaml", README, "a config YAML that does not parse", case_malformed_yaml),
        Case("malformed_yolo_yaml", README, "a YOLO data yaml that does not parse", case_yolo_bad_yaml,
             needs="yolo"),
        Case("missing_config", README, "a config file that does not exist", case_missing_config),
        Case("box_outside", README, "a VOC box 10 px outside the image", case_box_outside),
        Case("zero_size_box", README, "a VOC box with xmax = xmin - 1 (zero width)", case_zero_box),
        Case("unknown_class", README, "a VOC object class not in classes.txt", case_unknown_class),
        Case("yolo_class_id", README, "a YOLO label with class id 99", case_yolo_bad_class, needs="yolo"),
        Case("class_count_mismatch", README, "a teacher checkpoint with 3 classes", case_class_count),
        Case("unknown_config_key", README, "train.lrr=0.1", case_unknown_key, quick=True),
        Case("ill_typed_value", README, "train.epochs=many", case_bad_value_type),
        Case("duplicate_loss_label", README, "two cwd entries in loss.extra", case_duplicate_label),
        Case("missing_checkpoint", README, "mtkd eval --ckpt of a missing file", case_missing_ckpt),
        Case("pickled_teacher", README, "a pickled teacher checkpoint without trust_pickle", case_pickled_teacher),
        Case("missing_pretrained", README, "model.pretrained naming a missing file", case_missing_pretrained),
        Case("unlabeled_without_teacher", README, "data.unlabeled on a plain run", case_unlabeled_no_teacher),
        Case("image_modes", ISSUE, "16-bit, grayscale, RGBA and palette PNGs in predict", case_image_modes,
             quick=True),
        Case("float_image", ISSUE, "a float TIFF given to predict", case_float_image),
        Case("exif_predict", ISSUE, "an EXIF-rotated JPEG in predict", case_exif_predict),
        Case("exif_voc", ISSUE, "an EXIF-rotated JPEG in a VOC training set", case_exif_voc),
        Case("exif_yolo", ISSUE, "an EXIF-rotated JPEG with a YOLO label and no mask in training", case_exif_yolo,
             needs="yolo"),
        Case("coco_file_name_escape", ISSUE, "COCO file_name ../../../outside.jpg", case_coco_escape,
             needs="coco"),
        Case("coco_file_name_absolute", ISSUE, "COCO file_name an absolute path", case_coco_absolute,
             needs="coco"),
        Case("nonfinite_all_skipped", ISSUE, "train.nonfinite=skip with an inf teacher",
             case_nonfinite_all_skipped),
        Case("nonfinite_stop", ISSUE, "train.nonfinite=stop with an inf teacher", case_nonfinite_stop),
        Case("time_budget_stop", ISSUE, "train.time_budget_s=0.5 says why it stopped", case_time_budget),
        Case("new_class_without_list", ISSUE, "an unknown VOC class and no classes.txt", case_new_class_no_list),
        Case("disk_full", ISSUE, "checkpoint writes fail (file size limit 1 MB: EFBIG)", case_disk_full,
             quick=True),
        Case("read_only_train", ISSUE, "train into a read-only folder (EROFS)", case_read_only_train),
        Case("read_only_predict", ISSUE, "predict --out a read-only folder (EROFS)", case_read_only_predict),
        Case("yolo_missing_model", ISSUE, "mtkd yolo train model=yolov8n.pt absent (offline)",
             case_yolo_missing_model, needs="yolo"),
        Case("yolo_missing_data", ISSUE, "mtkd yolo train data= a missing yaml", case_yolo_missing_data,
             needs="yolo"),
        Case("truncated_checkpoint", ISSUE, "mtkd eval --ckpt cut in half", case_truncated_ckpt, quick=True),
        Case("state_dict_mismatch", ISSUE, "mtkd eval of a student_small checkpoint as teacher_small",
             case_state_dict_mismatch),
        Case("text_file_as_image", ISSUE, "/etc/hostname saved as hostname.jpg in predict", case_text_as_image),
        Case("predict_single_file", ISSUE, "mtkd predict --source FILE", case_predict_file),
        Case("yolo_teacher_directory", ISSUE, "mtkd yolo train teacher=DIR", case_yolo_teacher_dir, needs="yolo"),
        Case("yolo_teacher_yaml", ISSUE, "mtkd yolo train teacher=a data yaml", case_yolo_teacher_yaml,
             needs="yolo"),
        Case("sci_notation_lr", ISSUE, "train.lr=1e-3", case_sci_notation),
        Case("yolo_kd_t_zero", ISSUE, "mtkd yolo train kd_t=0", case_yolo_kd_t0, needs="yolo"),
        Case("yolo_kd_negative", ISSUE, "mtkd yolo train kd_cls=-1", case_yolo_kd_negative, needs="yolo"),
        Case("skip_bad_xml_class_list", ISSUE, "data.skip_bad with a cut XML and no classes.txt",
             case_malformed_xml_skip),
        Case("predict_skip_bad", ISSUE, "predict data.skip_bad=true with one corrupt image", case_predict_skip_bad),
        Case("sigterm", ISSUE, "SIGTERM during training", _signal_case(signal.SIGTERM)),
        Case("sigint", ISSUE, "SIGINT (Ctrl-C) during training", _signal_case(signal.SIGINT)),
        Case("metrics_split_read", ISSUE, "eval data.test=val records the split read", case_split_recorded),
        Case("yolo_seg_teacher", ISSUE, "mtkd yolo train teacher= an Ultralytics -seg model",
             case_yolo_seg_teacher, needs="yolo"),
        Case("yolo_teacher_names", ISSUE, "a teacher with the data's class count but other names",
             case_yolo_names, needs="yolo"),
        Case("tiny_imgsz", FOUND, "data.imgsz=32 with student_small: its seg head's stride-32 map would be 1x1; refused in one line", case_tiny_imgsz),
    ]


def run_case(ctx: Ctx, case: Case, timeout: float) -> Dict[str, Any]:
    d = ctx.work / "inputs" / case.id
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    rec: Dict[str, Any] = {"id": case.id, "source": case.source, "what": case.what}
    if case.needs != "voc" and not (ctx.data / case.needs).exists():
        rec.update(outcome="skipped", why=f"--data has no {case.needs}/ layout")
        return rec
    run = case.build(ctx, d)
    proc = spawn(run.args, d / "log", env=run.env, hooked=run.hooked, fsize=run.fsize)
    if run.send is not None:
        t0 = time.monotonic()
        while proc.poll() is None and not (d / "run" / "results.csv").exists() and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
        time.sleep(0.5)
        if proc.poll() is None:
            os.killpg(proc.pid, run.send)
    res = finish(proc, timeout)
    problem = run.check(res) if (run.check and res.rc is not None and
                                 (res.rc == 0 or run.send is not None)) else None
    if problem is None and run.expect == "fail" and res.rc not in (0, None):
        problem = message_problem(res, run.mentions, run.forbid, run.absent)
    elif problem is None and run.expect == "fail" and res.rc == 0 and run.absent:
        problem = message_problem(res, (), (), run.absent)
    outcome, why = classify(run.expect, res, problem, run.line, run.exit_code)
    rec.update(expect=run.expect, outcome=outcome, why=why, rc=res.rc, seconds=round(res.seconds, 1),
               command="mtkd " + " ".join(str(a).replace(str(ctx.work), "$WORK") for a in run.args))
    return rec


# -- output -------------------------------------------------------------------------------------
def markdown(payload: Dict[str, Any]) -> str:
    i = payload["inputs"]
    lines = ["# faults: kill -9 and bad input", "",
             f"Data: `{payload['data']}`; training runs: `{payload['budget']['config']}` "
             f"{' '.join(payload['budget']['overrides'])}, {payload['budget']['epochs']} epochs.", ""]
    lines += payload["derived"] + [""]
    if payload.get("chains"):
        lines += ["## Kill loop", "", "| chain | kills | write / random | in a write | last.pt torn | "
                  "temps left at end | final | exact | differs |", "|---|---|---|---|---|---|---|---|---|"]
        for r in payload["chains"]:
            ks = [x for x in r["kills"] if x["killed"]]
            lines.append(f"| {r['chain']} | {len(ks)} | {sum(x['kind'] == 'write' for x in ks)} / "
                         f"{sum(x['kind'] == 'random' for x in ks)} | {sum(bool(x.get('in_write')) for x in ks)} | "
                         f"{sum(x.get('last_pt_intact') is False for x in ks)} | {len(r['temps_at_end'])} | "
                         f"exit {r['final']['rc']} | {'yes' if r['exact'] else 'no'} | "
                         f"{'; '.join(r['differs'][:3]) or '-'} |")
        lines.append("")
    if payload.get("cases"):
        lines += ["## Bad input", "", f"{i['tried']} inputs: " + ", ".join(f"{o} {i[o]}" for o in OUTCOMES), "",
                  "| case | source | input | expect | outcome | exit | what happened |",
                  "|---|---|---|---|---|---|---|"]
        for c in payload["cases"]:
            why = str(c.get("why", "")).replace("|", "\\|")
            lines.append(f"| {c['id']} | {c['source']} | {c['what']} | {c.get('expect', '-')} | "
                         f"**{c['outcome']}** | {c.get('rc', '-')} | {why} |")
        lines.append("")
    return "\n".join(lines)


def derived(payload: Dict[str, Any]) -> List[str]:
    k, i = payload["kills"], payload["inputs"]
    out = []
    if k.get("tried"):
        out.append(f"Kills: {k['tried']} `kill -9`s ({k['write_kills']} aimed inside checkpoint writes, "
                   f"{k['in_write']} left a half-written temporary file), {k['exact']} followed by resumes "
                   f"that end equal to the uninterrupted run ({k['chains_exact']}/{k['chains']} chains exact); "
                   f"torn last.pt: {k['last_pt_torn']}; temporary files left at the end: {k['temps_left_at_end']}.")
    if i.get("tried"):
        out.append(f"Inputs: {i['tried']} tried: {i['clear']} clear errors, {i['ok']} handled correctly, "
                   f"{i['unclear']} unclear, {i['traceback']} tracebacks, {i['silent']} silent, "
                   f"{i['timeout']} timeouts.")
    met = (i.get("traceback", 0) == 0 and i.get("silent", 0) == 0 and i.get("timeout", 0) == 0
           and k.get("exact", 0) == k.get("tried", 0))
    out.append(f"Target (0 tracebacks, 0 silent failures, every resume exact): {'met' if met else 'NOT met'}.")
    return out


def write(out: Path, payload: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload["derived"] = derived(payload)
    _atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    _atomic_write(out / "results.md", markdown(payload))


def make_data(work: Path, timeout: float) -> Path:
    data = work / "data"
    if not (data / "voc").exists():
        shutil.rmtree(data, ignore_errors=True)
        res = run_cli(["make-synthetic", "--out", str(data), "--n-train", "8", "--n-val", "4", "--n-test", "4"],
                      work / "make_data_log", timeout)
        if res.rc != 0:
            raise SystemExit(f"faults: make-synthetic failed: {last_line(res.stderr)}")
    return data


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="a make-synthetic folder (voc/, optional coco/ and yolo/); default: a tiny one "
                        "written into the work folder (8 train, 4 val, 4 test images)")
    p.add_argument("--out", default="benchmarks/faults", help="where results.json and results.md go")
    p.add_argument("--work", default=None, help="folder of the runs (default: a temporary folder, removed)")
    p.add_argument("--kills", type=int, default=30, help="kill -9s in all (default 30)")
    p.add_argument("--write-kills", type=int, default=12, help="of them inside checkpoint writes (default 12)")
    p.add_argument("--chains", type=int, default=3, help="resume chains the kills are spread over (default 3)")
    p.add_argument("--epochs", type=int, default=6, help="epochs of the killed run, 2 steps each (default 6)")
    p.add_argument("--cases", nargs="*", default=None, help="only these bad-input cases (ids)")
    p.add_argument("--no-kills", action="store_true", help="skip the kill loop (the reference run still runs)")
    p.add_argument("--no-inputs", action="store_true", help="skip the bad inputs")
    p.add_argument("--quick", action="store_true", help="3 kills (1 in a write), one chain, 6 inputs")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one CLI run may take (default 1800: on 2 cores busy with other runs at normal "
                        "priority a nice'd 1-step run took 10 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.kills, args.write_kills, args.chains, args.epochs = 3, 1, 1, 3
    if args.write_kills > args.kills or args.chains < 1:
        p.error("--write-kills must be <= --kills and --chains >= 1")
    known = {c.id for c in cases()}
    if args.cases and set(args.cases) - known:
        p.error(f"--cases: unknown {sorted(set(args.cases) - known)}; known: {', '.join(sorted(known))}")

    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="mtkd_faults_") if own_work else args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        data = Path(args.data).resolve() if args.data else make_data(work, args.timeout)
        if not (data / "voc").is_dir():
            raise SystemExit(f"faults: --data {data}: no voc/ folder (write one with mtkd make-synthetic)")
        ctx = Ctx(work, data, args.epochs)
        payload: Dict[str, Any] = {
            "benchmark": "faults", "data": str(args.data or "tiny make-synthetic set (8/4/4 images)"),
            "budget": {"config": CONFIG, "overrides": list(TRAIN), "epochs": args.epochs, "kills": args.kills,
                       "write_kills": args.write_kills, "chains": args.chains, "seed": args.seed,
                       "quick": args.quick},
            "kills": {"tried": 0, "exact": 0}, "inputs": {"tried": 0, **{o: 0 for o in OUTCOMES}},
            "cases": [], "chains": []}
        loop = kill_loop(ctx, 0 if args.no_kills else args.kills, 0 if args.no_kills else args.write_kills,
                         args.chains, args.seed, args.timeout)
        payload["kills"], payload["chains"] = loop["summary"], loop["chains"]
        write(Path(args.out), payload)
        if not args.no_inputs:
            todo = [c for c in cases() if (c.id in args.cases if args.cases else (c.quick or not args.quick))]
            for case in todo:
                rec = run_case(ctx, case, args.timeout)
                print(f"[faults] {case.id}: {rec['outcome']} ({rec.get('why', '')[:160]})", flush=True)
                payload["cases"].append(rec)
                if rec["outcome"] in OUTCOMES:
                    payload["inputs"]["tried"] += 1
                    payload["inputs"][rec["outcome"]] += 1
                write(Path(args.out), payload)
        write(Path(args.out), payload)
        for line in payload["derived"]:
            print(line)
        return payload
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: distillation into an Ultralytics YOLO student, four ways, several seeds.

Roles (same student, data, epochs and starting weights; Ultralytics' ``seed=``
varies data order and augmentation):

* ``plain``: Ultralytics fine-tune, no teacher (``YOLO(student).train(...)``,
  what ``yolo train`` runs);
* ``ultralytics_kd``: the same with Ultralytics' own ``distill_model=teacher.pt``;
* ``mtkd_out``: ``mtkd yolo train`` with output-level KD (``kd_cls kd_dfl
  kd_obj kd_t``, ``kd_feat=0``);
* ``mtkd_out_feat``: the same plus neck-feature KD (``kd_feat``, ``--kd-feat``);
* ``plain_wall`` (equal wall-clock): plain, given Ultralytics' ``time=``
  budget equal to the training loop of the same seed's ``mtkd_out_feat`` run.

Every run goes through the path users run: the mtkd roles through
:func:`mtkd.yolo.cli.train` with the tokens parsed by
:func:`mtkd.yolo.cli.parse_args` (``mtkd yolo train key=value ...``), the
Ultralytics roles through ``YOLO(model).train(**args)`` with the same parsed
tokens. Each run is its own subprocess (clean state).

Protocol:

* **Data.** ``--data`` (a YOLO data yaml with ``train``, ``val`` and ``test``
  entries) or the synthetic set of :func:`mtkd.datasets.make_synthetic`
  written to ``<out>/data``: ``--n-train`` 200, ``--n-val`` 60, ``--n-test``
  300 images. VAL chooses (Ultralytics' ``best.pt``, the KD weights); TEST
  only scores: every record's ``map50_95``/``map50`` is its ``best.pt``
  validated on the test split, ``val_map50_95``/``val_map50`` the final
  validation on val.
* **Prepare** (``--prepare`` runs only this; any other sitting does it first
  when its outputs are missing): the teacher (``--teacher-model``,
  ``--teacher-epochs``; ``<out>/runs/teacher_s0/weights/last.pt``, or
  ``--teacher PATH``) and the student's starting weights (``--student``
  trained plainly for ``--pretrain-epochs``, ``<out>/runs/student_pretrain_s0``,
  or ``--student-init PATH``) train once, side by side, and are recorded as
  the runs ``teacher`` and ``student_pretrain`` with their times.
  ``--pretrain-epochs 0`` starts every seed from its own random init instead.
* **KD weights** (``--sweep``, into ``<out>/sweep/``): ``mtkd_out`` at each
  setting of :data:`SWEEP` (mtkd's default output weights scaled) beside
  ``plain``, on ``--sweep-seeds`` (100 101), ranked by median val mAP50-95.
  The main sitting takes ``--kd`` when given, else the sweep's winner when
  ``<out>/sweep/results.json`` exists, else mtkd's defaults; the source is
  recorded (``budget.kd_source``).
* **Roles x seeds** (default seeds 6 7 8, never used to choose anything):
  seed-major with the role order rotating from seed to seed
  (:func:`benchmarks.common.interleaved_plan`), ``--jobs`` runs at a time (one
  torch thread each); ``plain_wall`` follows once its ``mtkd_out_feat`` run
  has finished.
* **Records** (``results.json``'s ``runs``, :mod:`benchmarks.common`'s shape):
  ``role, seed, epochs, steps, wall_s`` (the training epochs' time, no
  validation), ``map50_95, map50`` (test), ``val_*``, ``epoch_s`` (median
  training epoch), ``epoch_cpu_s``, ``loop_s`` (train start to the last
  epoch's end), ``total_s`` (the whole subprocess), ``params``/``gflops`` of
  the deployed student (``YOLO(best.pt).model``).
* **Verdicts** (``derived``): the target is that ``mtkd_out`` (output KD at
  the val-chosen weights, fixed before the sitting) has its worst seed above
  plain's best seed on test mAP50-95 at equal epochs; reported beside it:
  ``mtkd_out_feat`` likewise, both against ``ultralytics_kd`` (median, worst
  seed, epoch time within 1.15x) and against ``plain_wall``.

Resumable: every finished run is written to ``<out>/results.json`` at once,
and a ``(role, seed)`` already there is skipped (``--force`` re-runs); a
sitting whose budget differs from the stored one stops with an error.

Default budget: teacher yolov8s 180 epochs (2340 steps at 96 px, about 30 min
on one CPU thread), student yolov8n pre-trained 60 epochs (about 4 min), then
20 fine-tuning epochs per run (about 2.5 min each): the prepare step about 35
min, the sweep 10 runs, the main sitting 15 runs.

    python benchmarks/yolo_kd/run.py --prepare            # teacher + starting weights, timed
    python benchmarks/yolo_kd/run.py --sweep              # KD weights on val -> <out>/sweep/
    python benchmarks/yolo_kd/run.py                      # 5 roles x seeds 6 7 8, judged on test

Tiny check: ``--quick`` (16/8/8 images at 64 px, yolov8n teacher, 1 epoch
everywhere, seed 0, one job; each run trains for seconds, about a minute with
start-up and scoring on a shared 2-core CPU), e.g.
``python benchmarks/yolo_kd/run.py --quick --out /tmp/yk``.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

NAME = "yolo_kd"
ROLES = ("plain", "ultralytics_kd", "mtkd_out", "mtkd_out_feat", "plain_wall")
MTKD_ROLES = ("mtkd_out", "mtkd_out_feat")
TARGET_ROLE = "mtkd_out"
"""The role the target judges: output KD at the weights chosen on val before the sitting."""
SWEEP: Dict[str, float] = {"x0.25": 0.25, "x0.5": 0.5, "x1": 1.0, "x2": 2.0}
"""Sweep settings: mtkd's default ``kd_cls kd_dfl kd_obj`` times this factor (``kd_t`` unchanged)."""
OUTPUT_WEIGHTS = ("kd_cls", "kd_dfl", "kd_obj")
METRICS = ("map50_95", "map50", "val_map50_95")
COST = ("epochs", "epoch_s", "wall_s", "params", "gflops")
PREPARED = ("data", "n_train", "n_val", "n_test", "imgsz", "batch", "student", "teacher", "teacher_model",
            "teacher_epochs", "student_init", "pretrain_epochs", "train_args")
"""Budget keys the prepared teacher and starting weights depend on: checked even with ``--force``."""
CHECKED = ("epochs", "val_every_epoch", "kd", "kd_feat", "settings")
"""Further budget keys whose change makes stored runs incomparable (``--force`` re-runs them instead)."""


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="YOLO data yaml with train, val and test entries (default: the synthetic set in <out>/data)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / NAME / "out"), help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the roles (default 6 7 8)")
    p.add_argument("--roles", nargs="+", default=list(ROLES), help=f"subset of {' '.join(ROLES)}")
    p.add_argument("--prepare", action="store_true",
                   help="only train (and time) the teacher and the student's starting weights")
    p.add_argument("--sweep", action="store_true", help="only the KD-weight sweep on val, into <out>/sweep")
    p.add_argument("--sweep-seeds", type=int, nargs="+", default=None, help="seeds of the sweep (default 100 101)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny setting that runs every code path (each run trains for seconds)")
    p.add_argument("--force", action="store_true",
                   help="re-run (role, seed) pairs already in results.json (the prepared teacher and starting "
                        "weights are kept: another --out trains new ones)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one torch thread each (default 2 on 2+ cores; 1 with --quick)")
    p.add_argument("--epochs", type=int, default=None, help="student epochs, every role (default 20)")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="teacher epochs (trained once, reused; default 180 = 2340 steps)")
    p.add_argument("--teacher", default=None, help="an existing teacher .pt to reuse instead of training one")
    p.add_argument("--teacher-model", default=None, help="teacher architecture (default yolov8s.yaml)")
    p.add_argument("--student", default="yolov8n.yaml", help="student architecture")
    p.add_argument("--student-init", default=None,
                   help="a student .pt every run starts from (default: the student pre-trained by the prepare step)")
    p.add_argument("--pretrain-epochs", type=int, default=None,
                   help="plain pre-training of the student, once (default 60; 0 = a random init per seed)")
    p.add_argument("--imgsz", type=int, default=None, help="image size (default 96)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--n-train", type=int, default=None, help="synthetic train images (default 200)")
    p.add_argument("--n-val", type=int, default=None, help="synthetic val images (default 60)")
    p.add_argument("--n-test", type=int, default=None, help="synthetic test images (default 300)")
    p.add_argument("--kd", nargs="+", default=None, metavar="KEY=VALUE",
                   help="mtkd KD arguments of both mtkd roles, as mtkd yolo train takes them "
                        "(default: the sweep's winner when <out>/sweep has one, else mtkd's defaults)")
    p.add_argument("--kd-feat", type=float, default=1.0, help="kd_feat of the mtkd_out_feat role")
    p.add_argument("--train-args", nargs="*", default=["optimizer=AdamW", "lr0=0.002"], metavar="KEY=VALUE",
                   help="Ultralytics train arguments of every run, teacher included (default optimizer=AdamW "
                        "lr0=0.002: optimizer=auto picks lr0 = 0.002 * 5 / (4 + nc), too low to train from scratch)")
    p.add_argument("--val", action="store_true", help="validate every epoch (default: only the last)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one training, print its JSON
    args = p.parse_args(argv)
    if args.one:
        return args
    q = args.quick
    defaults = {"seeds": [0] if q else [6, 7, 8], "sweep_seeds": [100] if q else [100, 101],
                "jobs": 1 if q else common.default_jobs(), "epochs": 1 if q else 20,
                "teacher_epochs": 1 if q else 180, "teacher_model": "yolov8n.yaml" if q else "yolov8s.yaml",
                "pretrain_epochs": 1 if q else 60, "imgsz": 64 if q else 96, "batch": 8 if q else 16,
                "n_train": 16 if q else 200, "n_val": 8 if q else 60, "n_test": 8 if q else 300}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [r for r in args.roles if r not in ROLES]
    if bad:
        p.error(f"--roles: unknown {' '.join(bad)}; known: {' '.join(ROLES)}")
    if args.prepare and args.sweep:
        p.error("--prepare and --sweep are separate sittings; give one")
    return args


def parse_tokens(tokens: Sequence[str], flag: str) -> Dict[str, Any]:
    """``key=value`` tokens typed by ``mtkd yolo train``'s parser; a bad token is a ConfigError naming ``flag``."""
    from mtkd.errors import ConfigError
    from mtkd.yolo.cli import parse_args

    try:
        return parse_args(list(tokens))
    except ConfigError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def tokens(args: Mapping[str, Any]) -> List[str]:
    """A dict of run arguments as ``key=value`` tokens (what ``mtkd yolo train`` is given)."""
    return [f"{k}={v}" for k, v in args.items()]


# -- one run, in its own process -------------------------------------------------------------------
def run_one(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Train one role from its tokens through the users' path, then score its ``best.pt`` on the test split.

    ``spec``: ``tokens`` (``key=value``, ``mtkd yolo train``'s syntax), ``threads``
    (torch CPU threads, or None), or ``evaluate`` (a checkpoint to score only).
    """
    from mtkd.env import go_offline

    go_offline()  # offline switches before any library import
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    args = parse_tokens(spec["tokens"], "run")
    if spec.get("evaluate"):
        return {**deployed(Path(spec["evaluate"]), args, Path(args["project"]) / args["name"]),
                "epochs_run": None, "steps": None, "train_wall_s": None}
    epoch_times: List[float] = []
    epoch_cpu: List[float] = []
    marks: Dict[str, float] = {}

    def epoch_start(_t: Any) -> None:
        marks["epoch"], marks["epoch_cpu"] = time.perf_counter(), time.process_time()

    def epoch_end(_t: Any) -> None:
        epoch_times.append(time.perf_counter() - marks["epoch"])
        epoch_cpu.append(time.process_time() - marks["epoch_cpu"])

    callbacks = {"on_train_start": [lambda t: marks.__setitem__("start", time.perf_counter())],
                 "on_train_epoch_start": [epoch_start], "on_train_epoch_end": [epoch_end],
                 "on_fit_epoch_end": [lambda t: marks.__setitem__("loop_end", time.perf_counter())]}
    if any(k.startswith("kd_") for k in args):
        from mtkd.yolo.cli import train

        trainer = train(dict(args), callbacks=callbacks)
    else:
        trainer = ultralytics_train(dict(args), callbacks)
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    metrics = trainer.metrics or {}
    report = deployed(best, args, Path(trainer.save_dir))
    epochs = len(epoch_times)
    report.update({
        "epochs_run": epochs, "steps": epochs * len(trainer.train_loader),
        "train_wall_s": round(sum(epoch_times), 2),
        "record": {
            "val_map50_95": round(float(metrics.get("metrics/mAP50-95(B)", 0.0)), 5),
            "val_map50": round(float(metrics.get("metrics/mAP50(B)", 0.0)), 5),
            "epoch_s": round(statistics.median(epoch_times), 3) if epoch_times else None,
            "epoch_cpu_s": round(statistics.median(epoch_cpu), 3) if epoch_cpu else None,
            "loop_s": round(marks.get("loop_end", 0.0) - marks.get("start", 0.0), 2) if "start" in marks else None,
            "weights": str(best)},
    })
    return report


def ultralytics_train(args: Dict[str, Any], callbacks: Mapping[str, Sequence[Any]]) -> Any:
    """``YOLO(model).train(**args)`` with ``callbacks``; returns the finished trainer."""
    from ultralytics import YOLO

    model = YOLO(str(args.pop("model")))
    for event, fns in callbacks.items():
        for fn in fns:
            model.add_callback(event, fn)
    model.train(**args)
    return model.trainer


def deployed(weights: Path, args: Mapping[str, Any], save_dir: Path) -> Dict[str, Any]:
    """Test-split mAP, parameters and GFLOPs of the model a user deploys: ``YOLO(weights).model``."""
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    model = YOLO(str(weights))
    keep = {k: args[k] for k in ("data", "imgsz", "batch", "device", "workers") if k in args}
    metrics = model.val(split="test", plots=False, verbose=False, project=str(save_dir), name="test",
                        exist_ok=True, **keep)
    return {"map50_95": round(float(metrics.box.map), 5), "map50": round(float(metrics.box.map50), 5),
            "params": int(get_num_params(model.model)),
            "gflops": round(float(get_flops(model.model, args.get("imgsz", 640))), 3)}


def yolo_job(role: str, run_tokens: Sequence[str], seed: int, out: str, epochs: Optional[int],
             threads: Optional[int], logs: str = ".", evaluate: Optional[str] = None) -> Tuple[Dict[str, Any], float]:
    """The job of :func:`benchmarks.common.run_jobs`: :func:`run_one` in a fresh interpreter.

    Returns ``(report, seconds)``; a failed run raises ``MtkdError`` naming its log.
    """
    from mtkd.errors import MtkdError

    spec = {"tokens": list(run_tokens), "threads": threads, "evaluate": evaluate}
    log_path = Path(logs) / f"{Path(out).name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, cwd=str(ROOT))
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise MtkdError(f"{role} seed {seed} failed (exit {proc.returncode}); see {log_path}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), secs


# -- the plan ---------------------------------------------------------------------------------------
def role_args(role: str, base: Mapping[str, Any], teacher: Path, kd: Mapping[str, Any], kd_feat: float,
              ref: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The run arguments of ``role`` on top of ``base``; ``None`` for ``plain_wall`` without its reference run."""
    args = dict(base)
    if role == "ultralytics_kd":
        args["distill_model"] = str(teacher)
    elif role in MTKD_ROLES:
        args.update(kd, kd_teacher=str(teacher), kd_feat=kd_feat if role == "mtkd_out_feat" else 0.0)
    elif role == "plain_wall":
        if not ref or not ref.get("loop_s"):
            return None
        args["time"] = float(ref["loop_s"]) / 3600.0
    return args


def plan(roles: Sequence[str], seeds: Sequence[int]) -> List[List[Tuple[str, int]]]:
    """Two phases of ``(role, seed)``: every role but ``plain_wall`` interleaved
    (:func:`common.interleaved_plan`), then ``plain_wall``, which needs its seed's ``mtkd_out_feat``."""
    first = common.interleaved_plan([r for r in roles if r != "plain_wall"], seeds)
    second = [("plain_wall", s) for s in seeds] if "plain_wall" in roles else []
    return [first, second]


# -- data, prepare -------------------------------------------------------------------------------
def ensure_data(args: argparse.Namespace, out: Path, synthetic: Optional[Mapping[str, Any]] = None) -> Tuple[Path, int]:
    """``(data yaml, number of classes)``: ``--data`` (which must have a test split) or the synthetic set
    (``--n-train/--n-val/--n-test`` images; ``synthetic``: further :func:`mtkd.datasets.make_synthetic` arguments)."""
    import yaml

    from mtkd.errors import ConfigError

    if args.data:
        data = Path(args.data).resolve()
        if not data.is_file():
            raise ConfigError(f"--data {data}: no such YOLO data yaml")
        spec = yaml.safe_load(data.read_text()) or {}
        if not spec.get("test"):
            raise ConfigError(f"--data {data}: no 'test' entry; the benchmark scores on a held-out test split")
    else:
        from mtkd.datasets import make_synthetic

        data = out / "data" / "yolo" / "data.yaml"
        spec = yaml.safe_load(data.read_text()) if data.is_file() else {}
        if not spec.get("test"):  # per-image seeding: an added test split leaves train and val as they were
            data = make_synthetic(out / "data", n_train=args.n_train, n_val=args.n_val, n_test=args.n_test,
                                  seed=0, formats=("yolo",), **dict(synthetic or {}))["yolo"]
            spec = yaml.safe_load(data.read_text())
    return data, len(spec["names"])


def save_init(student_cfg: str, data_yaml: Path, seed: int, path: Path) -> Path:
    """A randomly initialised student, saved the way Ultralytics reads checkpoints."""
    import torch
    import yaml
    from ultralytics.nn.tasks import DetectionModel

    names = yaml.safe_load(data_yaml.read_text())["names"]
    names = dict(enumerate(names)) if isinstance(names, list) else {int(k): v for k, v in names.items()}
    torch.manual_seed(seed)
    model = DetectionModel(student_cfg, nc=len(names), verbose=False)
    model.names = names
    torch.save({"model": model, "train_args": {}}, path)
    return path


def prepare(args: argparse.Namespace, res: common.Results, common_args: Mapping[str, Any],
            logs: Path) -> Tuple[Path, Optional[Path]]:
    """Teacher and starting weights, each trained once (side by side) and recorded with its time
    (``prepare_s``: the wall-clock of the two together).

    A ``--teacher`` checkpoint is only scored on the test split. Returns
    ``(teacher .pt, student init .pt, or None for a random init per seed)``.
    """
    from mtkd.errors import ConfigError

    record = common.recorder(res, NAME, res.write)
    jobs = []
    if args.teacher:
        teacher = Path(args.teacher).resolve()
        if not teacher.is_file():
            raise ConfigError(f"--teacher: {teacher} does not exist")
        if not res.has("teacher", 0):
            out = res.run_dir("teacher", 0)
            report, secs = yolo_job("teacher", tokens({**common_args, "model": str(teacher), "name": out.name}), 0,
                                    str(out), None, None, logs=str(logs), evaluate=str(teacher))
            record(("teacher", 0, out, {"weights": str(teacher), "reused": True}), report, secs, None)
    else:
        teacher = res.run_dir("teacher", 0) / "weights" / "last.pt"
        if not teacher.is_file() or not res.has("teacher", 0):
            out = res.run_dir("teacher", 0)
            t = tokens({**common_args, "model": args.teacher_model, "epochs": args.teacher_epochs, "seed": 0,
                        "name": out.name})
            jobs.append((("teacher", 0, out, {}), {"config": "teacher", "overrides": t, "seed": 0, "out": str(out)}))
    init: Optional[Path] = None
    if args.student_init:
        init = Path(args.student_init).resolve()
        if not init.is_file():
            raise ConfigError(f"--student-init: {init} does not exist")
    elif args.pretrain_epochs > 0:
        out = res.run_dir("student_pretrain", 0)
        init = out / "weights" / "last.pt"
        if not init.is_file() or not res.has("student_pretrain", 0):
            init0 = save_init(args.student, Path(common_args["data"]), 0, res.out / "init_s0.pt")
            t = tokens({**common_args, "model": str(init0), "epochs": args.pretrain_epochs, "seed": 0,
                        "name": out.name})
            jobs.append((("student_pretrain", 0, out, {}),
                         {"config": "student_pretrain", "overrides": t, "seed": 0, "out": str(out)}))
    if jobs:
        t0 = time.perf_counter()
        common.run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc=f"{NAME} prepare",
                        job=functools.partial(yolo_job, logs=str(logs)))
        res.write(prepare_s=round(time.perf_counter() - t0, 1))
    missing = [r for r, f in (("teacher", teacher), ("student_pretrain", init)) if f is not None and not f.is_file()]
    if missing:
        raise SystemExit(f"[{NAME}] prepare failed: no {' or '.join(missing)} weights; see {logs}")
    return teacher, init


# -- verdicts ----------------------------------------------------------------------------------------
def verdicts(runs: Sequence[Mapping[str, Any]], prepare_s: Optional[float] = None) -> Tuple[List[str], Dict[str, Any]]:
    """Derived lines and the machine-readable summary, on test mAP50-95 at equal epochs."""
    lines: List[str] = []
    summary: Dict[str, Any] = {}
    prep = {r["role"]: r for r in runs if r["role"] in ("teacher", "student_pretrain")}
    if prep:
        parts = [f"{role} " + (f"{r['epochs']} epochs, training {r['wall_s'] / 60:.1f} min" if r.get("wall_s")
                               else "reused")
                 + (f" ({r['total_s'] / 60:.1f} min in all)" if r.get("total_s") else "")
                 + f", test mAP50-95 {r.get('map50_95')}" for role, r in prep.items()]
        lines.append("prepare (once, side by side" + (f", {prepare_s / 60:.1f} min wall" if prepare_s else "")
                     + "): " + "; ".join(parts))
    plain = common._values(runs, "plain", "map50_95")
    teacher = common._values(runs, "teacher", "map50_95")
    if teacher and plain:
        margin = teacher[0] - statistics.median(plain)
        summary["teacher_margin"] = margin
        lines.append(f"teacher premise: teacher test mAP50-95 {teacher[0]:.4f} vs median plain "
                     f"{statistics.median(plain):.4f} ({margin:+.4f}); a KD claim needs a clearly better teacher")
    if not plain:
        lines.append("target: not yet measurable (no plain runs)")
        return lines, summary
    theirs = common._values(runs, "ultralytics_kd", "map50_95")
    epoch = {role: common.median_of(runs, role, "epoch_s") for role in ROLES}
    for role in MTKD_ROLES:
        ours = common._values(runs, role, "map50_95")
        if not ours:
            continue
        ok = min(ours) > max(plain)
        entry: Dict[str, Any] = {"worst_above_best_plain": ok,
                                 "beats_plain_median": statistics.median(ours) > statistics.median(plain)}
        tag = f"target: {'MET' if ok else 'NOT MET'}" if role == TARGET_ROLE else "reported only"
        lines.append(f"worst {role} seed above best plain seed (test mAP50-95, equal epochs; {tag}): "
                     f"{min(ours):.4f} vs {max(plain):.4f}; medians {statistics.median(ours):.4f} vs "
                     f"{statistics.median(plain):.4f}")
        if role == TARGET_ROLE:
            summary["target_met"] = ok
        if theirs:
            ratio = epoch[role] / epoch["ultralytics_kd"] if epoch[role] and epoch["ultralytics_kd"] else None
            entry["vs_ultralytics_kd"] = {"beats_median": statistics.median(ours) > statistics.median(theirs),
                                          "beats_worst_seed": min(ours) > min(theirs), "epoch_time_ratio": ratio,
                                          "within_1_15x": ratio is not None and ratio <= 1.15}
            v = entry["vs_ultralytics_kd"]
            lines.append(f"{role} vs ultralytics_kd: median {statistics.median(ours):.4f} vs "
                         f"{statistics.median(theirs):.4f} ({'above' if v['beats_median'] else 'not above'}), "
                         f"worst seed {min(ours):.4f} vs {min(theirs):.4f} "
                         f"({'above' if v['beats_worst_seed'] else 'not above'}), epoch time "
                         + (f"{ratio:.2f}x ({'within' if v['within_1_15x'] else 'over'} 1.15x)" if ratio else "-"))
        wall = common._values(runs, "plain_wall", "map50_95")
        if wall:
            entry["vs_plain_wall"] = {"beats_median": statistics.median(ours) > statistics.median(wall),
                                      "worst_above_best": min(ours) > max(wall)}
            lines.append(f"{role} vs plain_wall (plain at mtkd_out_feat's wall-clock, reported only): "
                         f"median {statistics.median(ours):.4f} vs {statistics.median(wall):.4f}")
        summary[role] = entry
    if epoch["plain"]:
        ratios = ", ".join(f"{r} {epoch[r] / epoch['plain']:.2f}x" for r in ROLES if r != "plain" and epoch[r])
        if ratios:
            lines.append(f"median epoch time vs plain: {ratios}")
    return lines, summary


# -- the sweep ------------------------------------------------------------------------------------
def sweep_kd(factor: float) -> Dict[str, Any]:
    """mtkd's default output weights times ``factor``."""
    from mtkd.yolo.trainer import KD_DEFAULTS

    return {k: round(float(KD_DEFAULTS[k]) * factor, 6) for k in OUTPUT_WEIGHTS}


def sweep_ranking(runs: Sequence[Mapping[str, Any]]) -> Tuple[List[str], Optional[str]]:
    """Rank the sweep's ``mtkd_out@<setting>`` roles by median then worst val mAP50-95; ``(lines, winner)``.

    Test metrics are never looked at.
    """
    rows = []
    for role in common.roles_of(runs):
        vals = common._values(runs, role, "val_map50_95")
        if vals:
            rows.append((statistics.median(vals), min(vals), role))
    plain = next((r for r in rows if r[2] == "plain"), None)
    kd = sorted((r for r in rows if r[2] != "plain"), key=lambda r: r[:2], reverse=True)  # ties: first run first
    lines = [f"{i + 1}. {role}: median val mAP50-95 {med:.4f} (worst {worst:.4f})"
             + (f", {med - plain[0]:+.4f} vs plain" if plain else "") for i, (med, worst, role) in enumerate(kd)]
    if plain:
        lines.append(f"plain: median val mAP50-95 {plain[0]:.4f}")
    winner = kd[0][2].split("@", 1)[1] if kd else None
    if winner:
        lines.insert(0, f"chosen on val: {winner} ({' '.join(tokens(sweep_kd(SWEEP[winner])))})")
    return lines, winner


def sweep_choice(out: Path) -> Optional[Tuple[str, Dict[str, Any]]]:
    """``(setting, kd args)`` the sweep in ``<out>/sweep`` chose, or None when there is none."""
    path = out / "sweep" / "results.json"
    if not path.is_file():
        return None
    choice = json.loads(path.read_text()).get("choice")
    return (choice["setting"], dict(choice["kd"])) if choice else None


def resolve_kd(kd_tokens: Optional[Sequence[str]], out: Path) -> Tuple[Dict[str, Any], str]:
    """The output KD arguments of both mtkd roles and where they come from: ``--kd``, else the
    sweep's choice in ``<out>/sweep``, else mtkd's defaults."""
    from mtkd.errors import ConfigError
    from mtkd.yolo.trainer import KD_DEFAULTS

    if kd_tokens:
        kd = parse_tokens(kd_tokens, "--kd")
        bad = [k for k in kd if k not in KD_DEFAULTS or k in ("kd_teacher", "kd_feat")]
        if bad:
            raise ConfigError(f"--kd: {bad[0]} is not an output KD argument (kd_cls kd_dfl kd_obj kd_t)")
        return kd, "--kd"
    chosen = sweep_choice(out)
    if chosen:
        return {**chosen[1], "kd_t": KD_DEFAULTS["kd_t"]}, f"val sweep ({out / 'sweep'}): {chosen[0]}"
    return {k: KD_DEFAULTS[k] for k in OUTPUT_WEIGHTS + ("kd_t",)}, "mtkd defaults (no sweep in <out>/sweep)"


# -- main -------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return {}
    from mtkd.env import go_offline

    go_offline()
    from mtkd.yolo.trainer import KD_DEFAULTS

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    data, nc = ensure_data(args, out)
    train_args = parse_tokens(args.train_args, "--train-args")
    common_args = dict(data=str(data), imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
                       amp=False, plots=False, val=args.val, project=str(out / "runs"), exist_ok=True, verbose=False,
                       **train_args)
    budget: Dict[str, Any] = {
        "data": str(data), "nc": nc, "imgsz": args.imgsz, "batch": args.batch, "device": args.device,
        "student": args.student, "teacher": str(Path(args.teacher).resolve()) if args.teacher else None,
        "teacher_model": None if args.teacher else args.teacher_model,
        "teacher_epochs": None if args.teacher else args.teacher_epochs,
        "student_init": str(Path(args.student_init).resolve()) if args.student_init else None,
        "pretrain_epochs": 0 if args.student_init else args.pretrain_epochs,
        "train_args": train_args}
    if not args.data:
        budget.update(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    common.check_budget(out / "results.json", budget, PREPARED, NAME,
                        hint="use the same settings or another --out (the teacher and starting weights depend on it)")
    main_sitting = not (args.prepare or args.sweep)
    budget.update(epochs=args.epochs, val_every_epoch=args.val, jobs=args.jobs)
    if main_sitting:
        kd, source = resolve_kd(args.kd, out)
        budget.update(kd=kd, kd_feat=args.kd_feat, kd_source=source, seeds=list(args.seeds), roles=list(args.roles))
        common.check_budget(out / "results.json", budget, CHECKED, NAME, args.force)
    res = common.Results(out, NAME, data=data, metrics=METRICS, cost=COST)  # keeps the stored budget's other keys
    # a prepare or sweep sitting leaves the main runs' own budget keys to the main sitting
    res.payload["budget"].update(budget if main_sitting else {k: v for k, v in budget.items()
                                                             if k not in CHECKED + ("jobs",)})
    teacher, init = prepare(args, res, common_args, logs)
    if args.prepare:
        return res.finish(verdicts(res.runs, res.payload.get("prepare_s"))[0])

    threads = 1 if args.jobs > 1 else None

    def base_args(seed: int, name: str) -> Dict[str, Any]:
        start = init or save_init(args.student, data, seed, out / f"init_s{seed}.pt")
        return {**common_args, "model": str(start), "epochs": args.epochs, "seed": seed, "name": name}

    if args.sweep:
        sw_budget = {**budget, "settings": {k: sweep_kd(f) for k, f in SWEEP.items()}, "kd_t": KD_DEFAULTS["kd_t"],
                     "seeds": list(args.sweep_seeds)}
        common.check_budget(out / "sweep" / "results.json", sw_budget, PREPARED + CHECKED, NAME, args.force)
        sw = common.Results(out / "sweep", f"{NAME} sweep", data=data, budget=sw_budget, metrics=METRICS, cost=COST)

        def refresh_sweep() -> None:
            lines, winner = sweep_ranking(sw.runs)
            sw.write(derived=lines, choice={"setting": winner, "kd": sweep_kd(SWEEP[winner])} if winner else None)

        roles = ["plain"] + [f"mtkd_out@{k}" for k in SWEEP]
        jobs = []
        for role, seed in common.interleaved_plan(roles, args.sweep_seeds):
            if sw.has(role, seed) and not args.force:
                continue
            run_dir = sw.run_dir(role, seed)
            a = {**base_args(seed, run_dir.name), "project": str(run_dir.parent)}
            if role != "plain":
                a = role_args("mtkd_out", a, teacher, sweep_kd(SWEEP[role.split("@", 1)[1]]), 0.0)
            jobs.append(((role, seed, run_dir, {}),
                         {"config": role, "overrides": tokens(a), "seed": seed, "out": str(run_dir)}))
        common.run_jobs(jobs, args.jobs, threads, common.recorder(sw, NAME, refresh_sweep), desc=f"{NAME} sweep",
                        job=functools.partial(yolo_job, logs=str(out / "sweep" / "logs")))
        lines, winner = sweep_ranking(sw.runs)
        return sw.finish(lines, choice={"setting": winner, "kd": sweep_kd(SWEEP[winner])} if winner else None)

    def refresh() -> None:
        lines, summary = verdicts(res.runs, res.payload.get("prepare_s"))
        res.write(derived=lines, summary=summary)

    record = common.recorder(res, NAME, refresh)
    for phase in plan(args.roles, args.seeds):
        jobs = []
        for role, seed in phase:
            if res.has(role, seed) and not args.force:
                continue
            run_dir = res.run_dir(role, seed)
            a = role_args(role, base_args(seed, run_dir.name), teacher, kd, args.kd_feat,
                          res.get("mtkd_out_feat", seed))
            if a is None:
                log(f"{role} seed {seed}: no mtkd_out_feat run of this seed to match, skipped")
                continue
            jobs.append(((role, seed, run_dir, {}),
                         {"config": role, "overrides": tokens(a), "seed": seed, "out": str(run_dir)}))
        common.run_jobs(jobs, args.jobs, threads, record, desc=NAME, job=functools.partial(yolo_job, logs=str(logs)))
    lines, summary = verdicts(res.runs, res.payload.get("prepare_s"))
    return res.finish(lines, summary=summary)


if __name__ == "__main__":
    common.cli(main, NAME)

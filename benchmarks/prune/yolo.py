#!/usr/bin/env python
"""Benchmark: prune a YOLO student with ``mtkd yolo prune``, recover it by fine-tuning or by distillation,
time Ultralytics' ONNX export in onnxruntime (``benchmarks/prune/run.py --yolo``).

Protocol:

* **Data.** ``--data`` (a YOLO data yaml with ``train``, ``val`` and
  ``test`` entries) or the small testbed's synthetic set (4000 / 500 / 500
  images of 64 px, 8 classes; :data:`mtkd.datasets.synthetic.TESTBEDS`)
  written in YOLO layout to ``<out>/data``. Every record's ``map50_95`` /
  ``map50`` is its weights validated on the test split (val only picks
  Ultralytics' ``best.pt``).
* **Student** (role ``unpruned``, seed 0): ``--student-model`` (yolov8n.yaml)
  trained plainly by Ultralytics for ``--epochs`` (20) at ``--imgsz`` (64),
  ``--batch`` (32), with ``--train-args`` (AdamW, lr0 0.002, as
  ``benchmarks/yolo_kd``), alone, on every core; its training time is
  reported. ``--student PATH`` takes trained Ultralytics weights instead
  (scored only).
* **Pruning** (role ``pruned``, no recovery): ``mtkd yolo prune
  model=<student> ratio=R importance=... round_to=... imgsz=...`` (the
  users' path, :func:`mtkd.yolo.prune.prune_yolo`). ``R`` is ``--ratio``, or
  the ratio whose pruned model keeps the share of the student's FLOPs nearest
  ``--size`` (0.5): a bisection over copies of the student pruned in memory,
  each step recorded in ``pruning.search``.
* **Recovery** (``--seeds``, default 0 1 2; ``--recovery`` (0.25) x the
  student's epochs each; ``--jobs`` at a time, one torch thread each): both
  through ``mtkd yolo train model=<pruned>.pt``, which trains the pruned
  model at its pruned widths. ``finetune``: every KD weight 0
  (``kd_cls=0 kd_dfl=0 kd_obj=0 kd_feat=0``), i.e. Ultralytics' loss alone
  (the teacher is loaded but never run); ``kd``: ``kd_teacher=`` the
  unpruned student with mtkd's default output KD weights (``--kd`` sets
  them), no feature KD.
* **Latency.** The unpruned and the pruned model are exported by
  Ultralytics' own ``YOLO(weights).export(format="onnx", dynamic=True)`` and
  timed in onnxruntime on the CPU (``intra_op_num_threads=1``) at batch 16
  (``ort_ms``) and batch 1 (``ort_ms_b1``), at ``--imgsz``, alternately
  (:func:`benchmarks.prune.run.ort_latency`): ``--ort-warmup`` (5) untimed
  runs, then the median of ``--ort-runs`` (50), before any recovery run
  starts. A recovered run has its architecture's (the pruned model's)
  latency; its ``best.pt`` is exported as well once all runs are done, which
  shows that a model trained by ``mtkd yolo train`` exports. Every record
  with an export carries ``onnx``, ``onnx_mb`` and ``onnx_output`` (the
  output's shape at batch 1).
* **Records** (``results.json``'s ``runs``, :mod:`benchmarks.common`'s
  shape): ``role, seed, epochs, steps, wall_s`` (training epochs only),
  ``map50_95, map50`` (test), ``params, gflops`` (Ultralytics' counts at
  ``--imgsz``), ``flops_frac`` (GFLOPs / the unpruned student's), ``ratio``,
  ``ort_ms, ort_ms_b1``, ``weights``.
* **Derived lines**: the FLOPs share reached (and whether it is within
  ``--size`` +- 0.05), whether the pruned model's ONNX output has the
  unpruned one's shape, the speed-up, each recovery's median share of the
  unpruned mAP, and the multi-task table's targets applied to ``kd``: the
  median keeps >= 95 % of the unpruned mAP50-95 and mAP50, the worst seed is
  above the best ``finetune`` seed on both, batch-16 latency >= 1.4x lower
  (MET / NOT MET).

Resumable like the other benchmarks: a finished ``(role, seed)`` in
``<out>/results.json`` is skipped, the pruned model and the timings are kept
while their inputs are the same; a sitting whose settings differ from the
stored runs' stops with an error (``--force`` re-runs everything; the data is
kept, another ``--out`` writes new data).

Default sitting: about 20-25 minutes on a 2-core CPU (the estimate is printed first).

    python benchmarks/prune/run.py --yolo                 # small testbed in YOLO layout -> benchmarks/prune/yolo/
    python benchmarks/prune/run.py --yolo --quick --out /tmp/py   # tiny data, 1 epoch everywhere, a few minutes
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402
from benchmarks.kd_gain.run import file_sha256  # noqa: E402
from benchmarks.prune.run import HALF, HALF_TOL, KEEP, SPEEDUP, latency_fields, ort_latency  # noqa: E402
from benchmarks.yolo_kd import run as yk  # noqa: E402

NAME = "prune_yolo"
RECOVERY = ("finetune", "kd")
METRICS = ("map50_95", "map50")
METRIC_NAMES = {"map50_95": "mAP50-95", "map50": "mAP50"}
COST = ("params", "gflops", "flops_frac", "ort_ms", "ort_ms_b1", "epochs", "steps", "wall_s")
ZERO_KD = {"kd_cls": 0.0, "kd_dfl": 0.0, "kd_obj": 0.0, "kd_feat": 0.0}
"""The ``finetune`` role's KD weights: none, so ``mtkd yolo train`` trains with Ultralytics' loss alone."""
SEARCH_STEPS = 7
"""Bisection steps of the channel ratio (stops early within :data:`SEARCH_TOL` of the size)."""
SEARCH_TOL = 0.01
MAX_RATIO = 0.9
CHECKED = ("data", "n_train", "n_val", "n_test", "imgsz", "batch", "student", "student_model", "epochs",
           "recovery_epochs", "size", "ratio", "importance", "round_to", "train_args", "kd")
"""Budget keys that must match the stored runs' for a sitting to add to them."""
DATA_KEYS = ("data", "n_train", "n_val", "n_test")
"""Budget keys the data in ``<out>/data`` depends on: checked even with ``--force``."""
QUICK = {"seeds": [0], "jobs": 1, "epochs": 1, "batch": 8, "ort_runs": 5, "ort_warmup": 1,
         "n_train": 16, "n_val": 8, "n_test": 8}
"""What ``--quick`` sets (unless given): tiny data, one epoch everywhere, one seed, few timing runs."""
EPOCH_CPU_S_PER_IMAGE = 0.010
"""CPU seconds per training image per epoch of yolov8n at 64 px on one thread of the 2-core machine (measured),
the base of the printed estimate."""
RECOVERY_COST = {"finetune": 0.65, "kd": 0.95}
"""Epoch cost of the recovery roles at half the FLOPs, relative to the student's (estimate only)."""
OVERHEAD_S = 180.0
"""Data, pruning, exports, timing, scoring and process start-ups of a default sitting (estimate only)."""


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--yolo", action="store_true", help=argparse.SUPPRESS)  # as benchmarks/prune/run.py is called
    p.add_argument("--data", default=None,
                   help="YOLO data yaml with train, val and test entries (default: the small testbed's synthetic "
                        "set in YOLO layout, written to <out>/data)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/prune/yolo)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds of the recovery runs (default 0 1 2)")
    p.add_argument("--device", default="cpu", help="device of every run (Ultralytics' device=; default cpu)")
    p.add_argument("--jobs", type=int, default=None,
                   help="recovery runs at a time, one torch thread each (default 2 with 2+ cores, else 1)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 16/8/8 images, student and recovery 1 epoch, one seed, 5 timing runs")
    p.add_argument("--force", action="store_true", help="re-train, re-prune, re-time and re-run everything")
    p.add_argument("--student", default=None, metavar="PT",
                   help="trained Ultralytics detection weights to prune instead of training --student-model")
    p.add_argument("--student-model", default="yolov8n.yaml", help="student architecture (default yolov8n.yaml)")
    p.add_argument("--epochs", type=int, default=None,
                   help="the student's epochs; the recovery runs get --recovery times them (default 20)")
    p.add_argument("--recovery", type=float, default=0.25,
                   help="recovery epochs as a share of the student's (default 0.25)")
    p.add_argument("--imgsz", type=int, default=64, help="image size of training, scoring and timing (default 64)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 32)")
    p.add_argument("--workers", type=int, default=0, help="Ultralytics data-loader workers (default 0)")
    p.add_argument("--size", type=float, default=HALF,
                   help=f"share of the student's FLOPs the ratio search aims at (default {HALF})")
    p.add_argument("--ratio", type=float, default=None,
                   help="channel ratio of mtkd yolo prune (default: searched to reach --size)")
    p.add_argument("--importance", choices=("magnitude", "lamp"), default="magnitude")
    p.add_argument("--round-to", type=int, default=8, help="channel multiple of pruned layers (default 8, "
                                                           "mtkd yolo prune's)")
    p.add_argument("--kd", nargs="+", default=None, metavar="KEY=VALUE",
                   help="output KD arguments of the kd role (kd_cls kd_dfl kd_obj kd_t; default mtkd's)")
    p.add_argument("--train-args", nargs="*", default=["optimizer=AdamW", "lr0=0.002"], metavar="KEY=VALUE",
                   help="Ultralytics train arguments of every run (default optimizer=AdamW lr0=0.002)")
    p.add_argument("--ort-runs", type=int, default=None, help="timed onnxruntime runs per model and batch (default 50)")
    p.add_argument("--ort-warmup", type=int, default=None, help="untimed runs first (default 5)")
    args = p.parse_args(argv)
    from mtkd.datasets.synthetic import TESTBEDS

    small = TESTBEDS["small"]
    defaults = {"out": str(ROOT / "benchmarks/prune/yolo"), "seeds": [0, 1, 2], "jobs": common.default_jobs(),
                "epochs": 20, "batch": 32, "ort_runs": 50, "ort_warmup": 5,
                "n_train": small["n_train"], "n_val": small["n_val"], "n_test": small["n_test"]}
    for key, value in {**defaults, **(QUICK if args.quick else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch < 1 or args.jobs < 1:
        p.error("--epochs, --batch and --jobs must be at least 1")
    if not 0.0 < args.recovery:
        p.error("--recovery: must be positive")
    if not 0.0 < args.size < 1.0:
        p.error(f"--size: must be in (0, 1), got {args.size}")
    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        p.error(f"--ratio: must be in (0, 1), got {args.ratio}")
    if args.imgsz < 32 or args.imgsz % 32:
        p.error(f"--imgsz: a positive multiple of 32, got {args.imgsz}")
    if args.ort_runs < 1 or args.ort_warmup < 0:
        p.error("--ort-runs must be at least 1 and --ort-warmup at least 0")
    return args


def recovery_epochs(epochs: int, share: float) -> int:
    """Epochs of a recovery run: ``share`` of the student's, at least 1."""
    return max(1, round(share * epochs))


def synthetic_settings() -> Dict[str, Any]:
    """The small testbed's generator settings besides its image counts."""
    from mtkd.datasets.synthetic import TESTBEDS

    return {k: v for k, v in TESTBEDS["small"].items() if k not in ("n_train", "n_val", "n_test")}


def estimate_s(args: argparse.Namespace) -> Dict[str, float]:
    """Rough seconds of a sitting from scratch on a 2-core CPU: ``student``, ``recovery``, ``rest``, ``total``."""
    per_epoch = args.n_train * EPOCH_CPU_S_PER_IMAGE * (args.imgsz / 64) ** 2
    student = 0.0 if args.student else args.epochs * per_epoch / 1.3  # alone, two threads
    rec = recovery_epochs(args.epochs, args.recovery)
    recovery = len(args.seeds) * rec * per_epoch * sum(RECOVERY_COST.values()) / min(args.jobs, 2)
    rest = OVERHEAD_S * (0.2 if args.quick else 1.0)
    return {"student": student, "recovery": recovery, "rest": rest, "total": student + recovery + rest}


# -- pruning ----------------------------------------------------------------------------------------
def search_ratio(weights: Path, imgsz: int, size: float, importance: str,
                 round_to: int) -> Tuple[float, List[Dict[str, float]]]:
    """The channel ratio whose pruned model keeps the share of the FLOPs nearest ``size``.

    Bisection on (0, :data:`MAX_RATIO`) with :func:`mtkd.yolo.prune.prune_detection` on copies of the
    model (the FLOPs share falls as the ratio grows); returns ``(ratio, [{"ratio", "flops_frac"}, ...])``.
    """
    from mtkd.yolo.prune import load_detection, prune_detection

    model, _ = load_detection(weights)
    lo, hi = 0.0, MAX_RATIO
    tried: List[Dict[str, float]] = []
    for _ in range(SEARCH_STEPS):
        mid = round((lo + hi) / 2, 4)
        rep = prune_detection(copy.deepcopy(model), imgsz, mid, importance=importance, round_to=round_to)
        share = rep["gflops_after"] / rep["gflops_before"]
        tried.append({"ratio": mid, "flops_frac": round(share, 4)})
        if abs(share - size) <= SEARCH_TOL:
            break
        lo, hi = (mid, hi) if share > size else (lo, mid)
    best = min(tried, key=lambda t: abs(t["flops_frac"] - size))
    return best["ratio"], tried


def prune_student(args: argparse.Namespace, student: Path, out: Path) -> Dict[str, Any]:
    """``out/pruned.pt``, written by ``mtkd yolo prune`` (reused when pruned before from the same weights and
    settings); returns its report plus the ratio ``search``."""
    from mtkd.yolo.prune import prune_yolo

    settings = {"student_sha256": file_sha256(student), "size": args.size, "ratio": args.ratio,
                "importance": args.importance, "round_to": args.round_to, "imgsz": args.imgsz}
    pruned, stamp = out / "pruned.pt", out / "bench.json"
    if not args.force and pruned.is_file() and stamp.is_file():
        stored = json.loads(stamp.read_text())
        if stored.get("settings") == settings:
            return stored["report"]
    search: List[Dict[str, float]] = []
    ratio = args.ratio
    if ratio is None:
        log(f"searching the channel ratio that keeps {args.size:g} of the FLOPs")
        ratio, search = search_ratio(student, args.imgsz, args.size, args.importance, args.round_to)
    cmd = [f"model={student}", f"ratio={ratio}", f"out={pruned}", f"importance={args.importance}",
           f"round_to={args.round_to}", f"imgsz={args.imgsz}"]
    log("mtkd yolo prune " + " ".join(cmd))
    report = dict(prune_yolo(yk.parse_tokens(cmd, "mtkd yolo prune")), search=search)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"settings": settings, "report": report}, indent=2) + "\n")
    return report


# -- ONNX -------------------------------------------------------------------------------------------
def export_onnx(weights: Path, imgsz: int) -> Path:
    """Ultralytics' own ONNX export of ``weights`` (dynamic batch), beside them; reused while newer."""
    from ultralytics import YOLO

    path = weights.with_suffix(".onnx")
    if path.is_file() and path.stat().st_mtime >= weights.stat().st_mtime:
        return path
    return Path(YOLO(str(weights)).export(format="onnx", imgsz=imgsz, dynamic=True, batch=16, device="cpu",
                                          verbose=False))


def onnx_fields(path: Path, imgsz: int) -> Dict[str, Any]:
    """A record's ``onnx`` path, ``onnx_mb`` and ``onnx_output`` (the first output's shape at batch 1, from
    onnxruntime)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, imgsz, imgsz), np.float32)})[0]
    return {"onnx": str(path), "onnx_mb": round(path.stat().st_size / 1e6, 3), "onnx_output": list(y.shape)}


# -- verdicts ---------------------------------------------------------------------------------------
def _f(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def verdicts(runs: Sequence[Mapping[str, Any]], size: float = HALF) -> Tuple[List[str], Dict[str, Any]]:
    """Derived lines and the machine-readable summary (see the module doc)."""
    lines: List[str] = []
    summary: Dict[str, Any] = {}
    first = {r["role"]: r for r in sorted(runs, key=lambda r: int(r["seed"]), reverse=True)}
    u, p = first.get("unpruned"), first.get("pruned")
    if u is None:
        return ["no unpruned student yet"], summary
    how = (f"trained {u['epochs']} epochs ({u['wall_s'] / 60:.1f} min of training)" if u.get("wall_s")
           else f"reused ({u.get('weights')})")
    lines.append(f"unpruned student: {how}, test mAP50-95 {_f(u.get('map50_95'))}, mAP50 {_f(u.get('map50'))}, "
                 f"{int(u['params']):,} params, {_f(u.get('gflops'), '.3f')} GFLOPs")
    if p is None:
        return lines, summary
    share = p["gflops"] / u["gflops"] if u.get("gflops") else None
    same_out = p.get("onnx_output") == u.get("onnx_output") if p.get("onnx_output") else None
    summary["pruned"] = {"ratio": p.get("ratio"), "flops_frac": share, "params_frac": p["params"] / u["params"],
                         "in_window": share is not None and abs(share - size) <= HALF_TOL,
                         "same_outputs": same_out}
    lines.append(f"pruned (mtkd yolo prune ratio={p.get('ratio')}): {_f(share, '.3f')} of the FLOPs "
                 f"({'within' if summary['pruned']['in_window'] else 'outside'} {size:g} +- {HALF_TOL}), "
                 f"{p['params'] / u['params']:.3f} of the params; ONNX output {p.get('onnx_output')} "
                 f"{'as' if same_out else 'NOT as'} the unpruned model's; no recovery: test mAP50-95 "
                 f"{_f(p.get('map50_95'))}, mAP50 {_f(p.get('map50'))}")
    speed = {b: u[k] / p[k] if u.get(k) and p.get(k) else None for b, k in (("b16", "ort_ms"), ("b1", "ort_ms_b1"))}
    summary["ort_speedup_b16"], summary["ort_speedup_b1"] = speed["b16"], speed["b1"]
    lines.append(f"onnxruntime (Ultralytics' ONNX export, 1 thread, timed alternately): batch 16 "
                 f"{_f(p.get('ort_ms'), '.3f')} vs {_f(u.get('ort_ms'), '.3f')} ms unpruned "
                 f"({_f(speed['b16'], '.2f')}x), "
                 f"batch 1 {_f(p.get('ort_ms_b1'), '.3f')} vs {_f(u.get('ort_ms_b1'), '.3f')} ms "
                 f"({_f(speed['b1'], '.2f')}x)")
    base = {m: u.get(m) for m in METRICS}
    values = {r: {m: common._values(runs, r, m) for m in METRICS} for r in RECOVERY}
    for r in RECOVERY:
        if not values[r]["map50"]:
            continue
        kept = {m: statistics.median(values[r][m]) / base[m] if base[m] else None for m in METRICS}
        summary[r] = {"median": {m: statistics.median(values[r][m]) for m in METRICS}, "kept": kept}
        seeds = ",".join(str(x["seed"]) for x in runs if x["role"] == r)
        lines.append(f"{r} (seeds {seeds}, {common.median_of(runs, r, 'epochs'):.0f} epochs): "
                     + ", ".join(f"{METRIC_NAMES[m]} median {statistics.median(values[r][m]):.4f} "
                                 f"({min(values[r][m]):.4f}-{max(values[r][m]):.4f}), keeps "
                                 f"{_f(kept[m] and 100 * kept[m], '.0f')} % of the unpruned" for m in METRICS))
    if values["kd"]["map50"] and values["finetune"]["map50"]:
        keeps = all(summary["kd"]["kept"][m] is not None and summary["kd"]["kept"][m] >= KEEP for m in METRICS)
        above = all(min(values["kd"][m]) > max(values["finetune"][m]) for m in METRICS)
        fast = speed["b16"] is not None and speed["b16"] >= SPEEDUP
        summary["targets"] = {f"keeps >= {KEEP:.0%} of unpruned": keeps, "worst seed above best finetune seed": above,
                              f"onnxruntime batch 16 >= {SPEEDUP}x lower": fast}
        mark = {True: "MET", False: "NOT MET"}
        lines += [f"target (kd): median keeps >= {KEEP:.0%} of the unpruned mAP50-95 and mAP50: {mark[keeps]}",
                  "target (kd): worst seed above the best finetune seed on mAP50-95 and mAP50 ("
                  + ", ".join(f"{min(values['kd'][m]):.4f} vs {max(values['finetune'][m]):.4f}" for m in METRICS)
                  + f"): {mark[above]}",
                  f"target (kd): onnxruntime batch 16 >= {SPEEDUP}x lower than unpruned "
                  f"({_f(speed['b16'], '.2f')}x): {mark[fast]}"]
    return lines, summary


# -- main -------------------------------------------------------------------------------------------
def ensure_student(args: argparse.Namespace, res: common.Results, common_args: Mapping[str, Any], logs: Path,
                   refresh: Any) -> Path:
    """The unpruned student's weights, trained (or, with ``--student``, scored) once as the role ``unpruned``."""
    from mtkd.errors import ConfigError

    run_dir = res.run_dir("unpruned", 0)
    if args.student:
        weights = Path(args.student).resolve()
        if not weights.is_file():
            raise ConfigError(f"--student: {weights} does not exist")
        if not res.has("unpruned", 0):
            log(f"scoring the given student {weights}")
            report = yk.deployed(weights, common_args, run_dir)
            res.add(common.make_record("unpruned", 0, report, weights=str(weights), reused=True), write=False)
        return weights
    rec = res.get("unpruned", 0)
    if rec is None or not Path(rec.get("weights", "")).is_file():
        log(f"training the student ({args.student_model}, {args.epochs} epochs at {args.imgsz} px)")
        a = {**common_args, "model": args.student_model, "epochs": args.epochs, "seed": 0, "name": run_dir.name}
        job = (("unpruned", 0, run_dir, {}), {"config": "unpruned", "overrides": yk.tokens(a), "seed": 0,
                                              "out": str(run_dir)})
        common.run_jobs([job], 1, None, common.recorder(res, NAME, refresh), desc=f"{NAME} student",
                        job=functools.partial(yk.yolo_job, logs=str(logs)))
        rec = res.get("unpruned", 0)
        if rec is None:
            raise SystemExit(f"[{NAME}] the student did not train; see {logs}")
    return Path(rec["weights"])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    from mtkd.env import go_offline

    go_offline()
    from mtkd.yolo.trainer import KD_DEFAULTS

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    data_budget: Dict[str, Any] = {"data": str(Path(args.data).resolve()) if args.data
                                   else str(out / "data" / "yolo" / "data.yaml")}
    if not args.data:
        data_budget.update(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    common.check_budget(out / "results.json", data_budget, DATA_KEYS, NAME,
                        hint="use the same data settings or another --out (its data is written once)")
    data, _nc = yk.ensure_data(args, out, None if args.data else synthetic_settings())
    train_args = yk.parse_tokens(args.train_args, "--train-args")
    kd = (yk.resolve_kd(args.kd, out)[0] if args.kd
          else {k: KD_DEFAULTS[k] for k in yk.OUTPUT_WEIGHTS + ("kd_t",)})
    rec_epochs = recovery_epochs(args.epochs, args.recovery)
    common_args = dict(data=str(data), imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
                       amp=False, plots=False, val=False, project=str(out / "runs"), exist_ok=True, verbose=False,
                       **train_args)
    budget = {**data_budget, "imgsz": args.imgsz, "batch": args.batch, "device": args.device,
              "student": str(Path(args.student).resolve()) if args.student else None,
              "student_model": None if args.student else args.student_model, "epochs": args.epochs,
              "recovery": args.recovery, "recovery_epochs": rec_epochs, "size": args.size, "ratio": args.ratio,
              "importance": args.importance, "round_to": args.round_to, "train_args": train_args, "kd": kd,
              "seeds": list(args.seeds), "jobs": args.jobs, "ort_runs": args.ort_runs,
              "ort_warmup": args.ort_warmup, "quick": args.quick}
    common.check_budget(out / "results.json", budget, CHECKED, NAME, args.force)
    est = estimate_s(args)
    log(f"estimate from scratch on a 2-core CPU: about {est['total'] / 60:.0f} min (student "
        f"{est['student'] / 60:.0f}, {len(args.seeds) * len(RECOVERY)} recovery runs of {rec_epochs} epochs "
        f"{est['recovery'] / 60:.0f}, the rest {est['rest'] / 60:.0f})")
    res = common.Results(out, NAME, data=data, budget=budget, metrics=METRICS, cost=COST)
    if args.force:
        res.payload.update(runs=[], latency={}, pruning={})
    latency: Dict[str, Dict[str, float]] = res.payload.setdefault("latency", {})
    t_start = time.perf_counter()

    def enrich(rec: Dict[str, Any]) -> Dict[str, Any]:
        arch = "unpruned" if rec["role"] == "unpruned" else "pruned"
        more: Dict[str, Any] = {"arch": arch, **latency_fields(latency.get(arch))}
        ref = res.get("unpruned", 0)
        if ref and ref.get("gflops") and rec.get("gflops") is not None:
            more["flops_frac"] = float(rec["gflops"]) / float(ref["gflops"])
        if arch == "pruned" and res.payload.get("pruning"):
            more["ratio"] = res.payload["pruning"]["ratio"]
        elif arch == "unpruned":
            more["ratio"] = 0.0
        return more

    def refresh() -> None:
        lines, summary = verdicts(res.runs, args.size)
        res.write(derived=lines, summary=summary)

    # the student, its pruned copy, both scored on the test split
    student = ensure_student(args, res, common_args, logs, refresh)
    prune_dir = out / "runs" / "pruned"
    report = prune_student(args, student, prune_dir)
    res.payload["pruning"] = report
    pruned = Path(report["out"])
    log(f"pruned: ratio {report['ratio']}, {report['gflops_after'] / report['gflops_before']:.3f} of the FLOPs, "
        f"{report['params_after']:,} of {report['params_before']:,} params")
    prev = res.get("pruned", 0)
    if prev is None or prev.get("sha256") != file_sha256(pruned):
        rep = yk.deployed(pruned, common_args, prune_dir)
        res.add(common.make_record("pruned", 0, dict(rep, epochs_run=0, steps=0), weights=str(pruned),
                                   sha256=file_sha256(pruned)), write=False)

    # Ultralytics' ONNX export of both, timed alternately before any recovery run loads the CPUs
    weights = {"unpruned": student, "pruned": pruned}
    onnx = {arch: export_onnx(w, args.imgsz) for arch, w in weights.items()}
    timing = {"runs": args.ort_runs, "warmup": args.ort_warmup,
              "models": {arch: file_sha256(path) for arch, path in weights.items()}}
    if args.force or res.payload.get("latency_settings") != timing:
        log(f"timing both ONNX files in onnxruntime (1 thread, batch 16 and 1, {args.imgsz} px, "
            f"{args.ort_runs} runs after {args.ort_warmup} warm-up)")
        latency.clear()
        latency.update(ort_latency(onnx, args.imgsz, args.ort_runs, args.ort_warmup))
        res.payload["latency_settings"] = timing
    for arch in weights:
        rec = res.get(arch, 0)
        rec.update(onnx_fields(onnx[arch], args.imgsz), **enrich(rec))
    refresh()

    # recovery, seed-major, the role order rotating
    jobs = []
    for r, seed in common.interleaved_plan(list(RECOVERY), args.seeds):
        if res.has(r, seed) and not args.force:
            continue
        run_dir = res.run_dir(r, seed)
        a = {**common_args, "model": str(pruned), "epochs": rec_epochs, "seed": seed, "name": run_dir.name,
             "kd_teacher": str(student), **(ZERO_KD if r == "finetune" else {**kd, "kd_feat": 0.0})}
        jobs.append(((r, seed, run_dir, {"init": str(pruned)}),
                     {"config": r, "overrides": yk.tokens(a), "seed": seed, "out": str(run_dir)}))
    log(f"{len(jobs)} recovery runs of {rec_epochs} epochs ({args.recovery:g} x the student's {args.epochs})")
    common.run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, common.recorder(res, NAME, refresh, enrich),
                    desc=NAME, job=functools.partial(yk.yolo_job, logs=str(logs)))

    # every recovered model through Ultralytics' export, once nothing else runs
    for rec in res.runs:
        if rec["role"] in RECOVERY and rec.get("weights") and not rec.get("onnx"):
            rec.update(onnx_fields(export_onnx(Path(rec["weights"]), args.imgsz), args.imgsz))
    for rec in res.runs:
        rec.update(enrich(rec))
    lines, summary = verdicts(res.runs, args.size)
    return res.finish(lines, summary=summary, sitting_s=round(time.perf_counter() - t_start, 1))


if __name__ == "__main__":
    from mtkd.errors import MtkdError

    try:
        main()
    except MtkdError as exc:  # bad input: one line
        sys.exit(f"[{NAME}] error: {exc}")

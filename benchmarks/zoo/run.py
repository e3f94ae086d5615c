#!/usr/bin/env python
"""Benchmark: every KD-zoo loss against a plain student, same short budget, several seeds.

Protocol (classification, the default):

1. Data: ``--data`` (an ImageFolder root with ``train/``, ``val/`` and
   optionally ``test/``), or the synthetic texture set written by
   :func:`mtkd.tasks.classify.cli.make_classify_data` into ``<runs>/data``
   (8 classes, 64 train / 16 val / 32 test images per class, 32 px; with
   batch 32 that is 16 steps per epoch).
2. Teacher: ``mtkd/configs/classify/teacher.yaml`` with ``model.backbone`` =
   ``--teacher-arch`` (default ``cnn8``: the student's 4-block layout with two
   convs per block and doubled widths, ~14x its FLOPs, feature maps of the
   same sizes under the same names) trained once for ``--teacher-epochs``
   (role ``teacher``, seed 0), or ``--teacher PATH`` (then only evaluated on
   the test split). A torchvision ResNet-18 was the first choice and was
   measured not to beat the student at 32 px (its stem downsamples 4x).
3. Plain: ``mtkd/configs/classify/student_plain.yaml`` (4-block CNN, CE only),
   one run per seed. The teacher must beat the plain student's median test
   top1 by ``--min-gap`` points; otherwise the benchmark writes what it has,
   says so and stops (exit 1): distilling from a teacher no better than the
   student measures nothing.
4. Each loss of ``--losses`` (default: all 21 of the zoo), one run per seed:
   the plain student's config plus the teacher and
   ``loss = CE + lambda * KD``, the form and the ``lambda`` of the
   reference's train scripts (AberHu/Knowledge-Distillation-Zoo
   ``example_train_script.sh``, :data:`CLASSIFY_LOSSES`), with the loss's
   defaults otherwise. Every run has the same epochs (``--epochs``), batch,
   schedule and seed-determined data order; only the loss differs.
   Defaults: students 6 epochs (96 steps), the teacher 40 (640 steps).

Dense (``--dense``): the dense-capable losses (:data:`DENSE_LOSSES`; BSS,
Sobolev and LwM need class logits and labels) on the multi-task set
``--dense-data`` with ``mtkd/configs/synthetic_student.yaml`` and the teacher
checkpoint ``--dense-teacher``, plus the plain multi-task student and the
teacher's own test metrics (roles ``<name>@dense``); metrics map50_95,
map50, miou. The same gate applies: the teacher's test miou must beat the
plain student's median by ``--dense-min-gap``; dense verdicts are on miou.
The KD terms are added to the student's detection and
segmentation hard losses as ``loss.extra`` with the same ``lambda``.

Choices where the references are silent (all recorded in ``results.json``):

* ``ft``: the paraphraser pre-trains for the first epoch's steps
  (``para_steps``), the reference's 30 separate epochs being out of budget;
* ``crd``: ``n_data`` = the training set size, ``nce_k`` = min(16384,
  4 x n_data) negatives (the reference's 16384 is sized for CIFAR's 50k);
* ``lwm`` compares one feature map of equal size in both models: f3 (stride
  8) of the student with f3 of a CNN teacher, or f2 of a ResNet (also
  stride 8). Failed runs are recorded with ``error`` (and no metrics),
  shown in the table, and retried on the next sitting;
* the input normalisation is computed once from the training images and
  given to every run (``data.mean``/``data.std``), plots and TensorBoard are
  off: per-run overhead, not part of any method;
* a run's metrics are on the TEST split with its ``best.pt`` (chosen on val
  top1); ``wall_s`` is training time only (no validation), see
  :mod:`benchmarks.common`.

Verdict per loss (``derived`` lines): with ``d`` = median top1 of the loss
minus median top1 of plain, "helps" when the loss's median is above every
plain seed, "hurts" when below every plain seed, otherwise "no clear
difference" (within the plain seeds' spread); plus the fraction of the
teacher-plain gap closed.

Outputs: ``<out>/results.json`` (``{"benchmark": "zoo", "data", "budget",
"teacher", "losses", "runs": [{role, loss, set, seed, epochs, steps, wall_s,
top1, top5 | map50_95, map50, miou, params, gflops, out}], "derived"}``) and
``<out>/results.md``; run folders (checkpoints) go to ``--runs``, outside the
repository. Resumable: finished ``(role, seed)`` records are skipped.

Parallel runs (``--jobs``, default 2 on a machine with 2+ cores): the
teacher trains alone with every thread (``--threads``, default the CPU
count); the plain and distilled students, independent runs, train
``--jobs`` at a time, each in its own spawned process with ``threads //
jobs`` torch threads, and are recorded as they finish. On 2 cores two
1-thread runs finish sooner than one 2-thread run after another: these tiny
models do not keep two threads busy. ``wall_s`` of a run is then its own
training time on one thread beside another run; the budget records
``jobs``.

Full default run (cost measured in ``benchmarks/zoo/README.md``)::

    python benchmarks/zoo/run.py

Tiny check::

    python benchmarks/zoo/run.py --out /tmp/zoo --runs /tmp/zoo/runs --losses st at --seeds 0 \\
        --epochs 1 --teacher-epochs 1 --min-gap -100 --per-class 8 --test-per-class 4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(ROOT))

from benchmarks import common  # noqa: E402

CONFIGS = ROOT / "mtkd" / "configs"
TEACHER_CFG = CONFIGS / "classify" / "teacher.yaml"
PLAIN_CFG = CONFIGS / "classify" / "student_plain.yaml"
DENSE_STUDENT_CFG = CONFIGS / "synthetic_student.yaml"
DENSE_TEACHER_CFG = CONFIGS / "synthetic_teacher.yaml"

CLASSIFY_METRICS = ("top1", "top5")
CLASSIFY_COST = ("epochs", "steps", "wall_s")
DENSE_METRICS = common.METRICS

#: name -> (lambda, loss kwargs): the reference train script's lambda_kd and options.
CLASSIFY_LOSSES: Dict[str, tuple] = {
    "logits": (0.1, {}),
    "st": (0.1, {"T": 4.0}),
    "at": (1000.0, {"p": 2.0}),
    "fitnet": (0.1, {}),
    "nst": (10.0, {}),
    "pkt": (10000.0, {}),
    "fsp": (1.0, {}),
    "ft": (200.0, {"k": 0.5}),
    "rkd": (1.0, {"w_dist": 25.0, "w_angle": 50.0}),
    "ab": (10.0, {"margin": 2.0}),
    "sp": (3000.0, {}),
    "sobolev": (20.0, {}),
    "bss": (2.0, {"T": 3.0, "attack_size": 32}),
    "cc": (100.0, {"gamma": 0.4, "P_order": 2}),
    "lwm": (0.4, {"feat": "f3", "teacher_feat": "f3"}),  # stride 8 in cnn4 and cnn8 (a ResNet's: f2)
    "irg": (1.0, {"w_irg_vert": 0.1, "w_irg_edge": 5.0, "w_irg_tran": 5.0}),
    "vid": (1.0, {"sf": 1.0, "init_var": 5.0}),
    "ofd": (0.5, {}),
    "afd": (500.0, {"att_f": 1.0}),
    "crd": (0.2, {"feat_dim": 128, "nce_t": 0.1, "nce_m": 0.5}),
    "dml": (1.0, {}),
}

#: Losses that also run on dense multi-task outputs, with their dense-only options.
DENSE_LOSSES: Dict[str, Dict[str, Any]] = {
    "logits": {"output": "seg", "ignore_void": True}, "st": {"output": "seg", "ignore_void": True},
    "at": {}, "fitnet": {}, "nst": {}, "pkt": {}, "fsp": {}, "ft": {}, "rkd": {}, "ab": {}, "sp": {},
    "cc": {}, "irg": {}, "vid": {}, "ofd": {}, "afd": {}, "crd": {}, "dml": {"key": "seg", "ignore_void": True},
}


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None,
                   help="ImageFolder root (train/ val/ [test/]); default: the synthetic set in <runs>/data")
    p.add_argument("--losses", nargs="+", default=list(CLASSIFY_LOSSES), metavar="NAME",
                   help="zoo losses to run (default: all 21)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=6, help="student epochs, every role (default 6)")
    p.add_argument("--teacher-epochs", type=int, default=40, help="teacher epochs (trained once; default 40)")
    p.add_argument("--teacher", default=None, help="an existing classification teacher checkpoint to reuse")
    p.add_argument("--teacher-arch", default="cnn8",
                   help="the teacher: cnn8 (default), or a torchvision/timm classifier name")
    p.add_argument("--min-gap", type=float, default=5.0,
                   help="required teacher - plain median test top1, in points (default 5)")
    p.add_argument("--out", default="benchmarks/zoo", help="results.json / results.md folder")
    p.add_argument("--runs", default="runs/bench_zoo", help="run folders (checkpoints) and generated data")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every classification run (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in all (default: the CPU count); the teacher uses them all, "
                        "each of the --jobs parallel student runs its share")
    p.add_argument("--jobs", type=int, default=common.default_jobs(),
                   help="student runs trained at once, each in its own process (default: 2 on 2+ cores)")
    g = p.add_argument_group("synthetic data (without --data)")
    g.add_argument("--classes", type=int, default=8)
    g.add_argument("--per-class", type=int, default=64)
    g.add_argument("--test-per-class", type=int, default=32)
    g.add_argument("--imgsz", type=int, default=32)
    d = p.add_argument_group("dense (multi-task) runs")
    d.add_argument("--dense", action="store_true", help="also run the dense-capable losses on the multi-task set")
    d.add_argument("--dense-data", default=None, help="VOC root of the multi-task set")
    d.add_argument("--dense-teacher", default=None, help="multi-task teacher checkpoint")
    d.add_argument("--dense-epochs", type=int, default=3, help="dense student epochs (default 3)")
    d.add_argument("--dense-min-gap", type=float, default=0.02,
                   help="required teacher - plain median test miou on the multi-task set (default 0.02)")
    d.add_argument("--dense-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every dense run (repeatable)")
    args = p.parse_args(argv)
    unknown = [n for n in args.losses if n not in CLASSIFY_LOSSES]
    if unknown:
        p.error(f"--losses: unknown {unknown}; known: {' '.join(CLASSIFY_LOSSES)}")
    if args.dense and not (args.dense_data and args.dense_teacher):
        p.error("--dense needs --dense-data (VOC root) and --dense-teacher (checkpoint)")
    return args


# -- configs ------------------------------------------------------------------------------------
def _q(value: Any) -> str:
    """An override value: JSON is YAML, so strings, lists and mappings parse back as given."""
    return json.dumps(value)


def loss_entry(name: str, n_data: int, steps_per_epoch: int, dense: bool,
               teacher_arch: str = "cnn8") -> Dict[str, Any]:
    """The ``loss.extra`` entry of ``name``: weight = the reference's lambda, plus its options."""
    from mtkd.tasks.classify.models import CNN_VARIANTS

    lam, kwargs = CLASSIFY_LOSSES[name]
    entry: Dict[str, Any] = {"name": name, "weight": lam, **kwargs}
    if name == "lwm" and not dense and teacher_arch not in CNN_VARIANTS:
        entry["teacher_feat"] = "f2"  # torchvision/timm ResNets: stride 8 is f2
    if dense:
        entry.update(DENSE_LOSSES[name])
    if name == "ft":
        entry["para_steps"] = max(1, steps_per_epoch)
    if name == "crd":
        entry.update(n_data=n_data, nce_k=min(16384, 4 * n_data))
    return entry


def count_images(folder: Path) -> int:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from mtkd.imageio import list_images

    return len(list_images(folder, IMG_EXTENSIONS))


def steps_per_epoch(n_train: int, batch: int) -> int:
    """The trainer's optimizer steps per epoch (last partial batch dropped when one full batch exists)."""
    return n_train // batch if n_train >= batch else 1


# -- records --------------------------------------------------------------------------------------
def classify_record(role: str, seed: int, report: Dict[str, Any], out: Path, **extra: Any) -> Dict[str, Any]:
    rec = common.make_record(role, seed, report, out=out, set="classify", **extra)
    for k in common.METRICS:
        rec.pop(k, None)
    for k in CLASSIFY_METRICS:
        rec[k] = float(report[k]) if isinstance(report.get(k), (int, float)) else None
    return rec


def run_or_fail(res: common.Results, role: str, seed: int, fn: Any, **extra: Any) -> Optional[Dict[str, Any]]:
    """``fn()`` -> a record added to ``res``; an ``MtkdError`` is recorded as ``error`` instead."""
    from mtkd.errors import MtkdError

    t0 = time.perf_counter()
    try:
        rec = fn()
    except MtkdError as exc:
        rec = failed_record(role, seed, exc, **extra)
    add_record(res, rec, time.perf_counter() - t0)
    return rec if "error" not in rec else None


def failed_record(role: str, seed: int, error: Exception, **extra: Any) -> Dict[str, Any]:
    print(f"[zoo] {role} seed {seed} failed: {error}", file=sys.stderr)
    return {"role": role, "seed": int(seed), "error": str(error), **extra}


def add_record(res: common.Results, rec: Dict[str, Any], secs: float) -> None:
    """Store a finished run (``total_s``: its seconds, build and evaluation included) and rewrite the results."""
    rec["total_s"] = secs
    res.add(rec, write=False)
    write(res)


def dense_record(role: str, seed: int, report: Dict[str, Any], out: Path, **extra: Any) -> Dict[str, Any]:
    return common.make_record(role, seed, report, out, set="dense", **extra)


def job_recorder(res: common.Results, make: Any, set_name: str) -> Any:
    """The ``on_done`` of :func:`common.run_jobs` for jobs keyed ``(role, seed, out, extra)``.

    ``make(role, seed, report, out, **extra)`` builds a finished run's record; a
    failed run (config or data error) is recorded with ``error`` instead.
    """
    def on_done(key: tuple, report: Optional[Dict[str, Any]], secs: float, error: Optional[Exception]) -> None:
        role, seed, out, extra = key
        rec = (make(role, seed, report, out, **extra) if error is None
               else failed_record(role, seed, error, set=set_name, **extra))
        add_record(res, rec, secs)
    return on_done


def job_threads(args: argparse.Namespace) -> int:
    """Torch threads of each parallel student run: the thread budget split over ``--jobs``."""
    import os

    return max(1, (args.threads or os.cpu_count() or 1) // max(1, args.jobs))


def done(res: common.Results, role: str, seed: int) -> bool:
    rec = res.get(role, seed)
    return rec is not None and "error" not in rec


# -- report ---------------------------------------------------------------------------------------
def verdicts(runs: Sequence[Dict[str, Any]], losses: Sequence[str], suffix: str, metric: str) -> List[str]:
    """The per-loss verdict lines (module doc) for one set (suffix '' or '@dense')."""
    ok = [r for r in runs if "error" not in r]
    plain = [float(r[metric]) for r in ok if r["role"] == "plain" + suffix and r.get(metric) is not None]
    teacher = common.median_of(ok, "teacher" + suffix, metric)
    if not plain:
        return []
    p_med, p_min, p_max = statistics.median(plain), min(plain), max(plain)
    lines = [f"plain{suffix}: median {metric} {p_med:.3f} over {len(plain)} seeds (min {p_min:.3f}, max {p_max:.3f})"]
    if teacher is not None:
        lines.append(f"teacher{suffix}: {metric} {teacher:.3f} ({teacher - p_med:+.3f} vs plain median)")
    for name in losses:
        role = name + suffix
        vals = [float(r[metric]) for r in ok if r["role"] == role and r.get(metric) is not None]
        errs = [r for r in runs if r["role"] == role and "error" in r]
        if not vals:
            if errs:
                lines.append(f"{role}: FAILED ({errs[0]['error']})")
            continue
        med = statistics.median(vals)
        verdict = ("helps" if med > p_max else "hurts" if med < p_min
                   else "no clear difference (within the plain seeds' spread)")
        closed = common.gap_closed(teacher, p_med, med) if teacher is not None else None
        gap = f", closes {closed:.0%} of the teacher-plain gap" if closed is not None else ""
        lines.append(f"{role}: median {metric} {med:.3f} ({med - p_med:+.3f} vs plain){gap}: {verdict}")
    return lines


def markdown(payload: Dict[str, Any]) -> str:
    """Two tables (classification top1/top5, dense mAP/mIoU) plus failures and verdicts."""
    runs = [r for r in payload.get("runs", []) if "error" not in r]
    cls = {**payload, "runs": [r for r in runs if r.get("set") != "dense"]}
    dense = {**payload, "runs": [r for r in runs if r.get("set") == "dense"]}
    parts = [common.markdown(cls, metrics=CLASSIFY_METRICS, cost=CLASSIFY_COST).rstrip()]
    if dense["runs"]:
        dense["benchmark"] = f"{payload['benchmark']} (dense, multi-task set)"
        dense["data"] = payload.get("dense_data")
        parts.append(common.markdown(dense, metrics=DENSE_METRICS, cost=CLASSIFY_COST).rstrip())
    if payload.get("sittings"):  # how the runs were made, when that differs between sittings
        parts.append("Sittings:\n\n" + "\n".join(f"- {x}" for x in payload["sittings"]))
    for key in ("stopped", "stopped_dense"):
        if payload.get(key):
            parts.append(f"**Stopped:** {payload[key]}.")
    failed = [r for r in payload.get("runs", []) if "error" in r]
    if failed:
        parts.append("Failed runs:\n\n" + "\n".join(f"- {r['role']} seed {r['seed']}: {r['error']}" for r in failed))
    if payload.get("derived"):
        parts.append("Verdicts (test split; 'helps' = median above every plain seed):\n\n"
                     + "\n".join(f"- {d}" for d in payload["derived"]))
    return "\n\n".join(parts) + "\n"


def write(res: common.Results) -> None:
    """``results.json`` via :class:`common.Results`, then our two-table ``results.md`` over it."""
    runs = res.runs
    losses = list(res.payload.get("losses", []))
    derived = verdicts(runs, losses, "", "top1")
    dense_losses = [n for n in losses if n in DENSE_LOSSES]
    derived += verdicts(runs, dense_losses, "@dense", "miou")
    res.write(derived=derived)
    res.md_path.write_text(markdown(res.payload))


# -- the benchmark --------------------------------------------------------------------------------
def prepare_data(args: argparse.Namespace) -> Path:
    if args.data is not None:
        root = Path(args.data)
        if not (root / "train").is_dir():
            from mtkd.errors import DataError

            raise DataError(f"--data {root}: expected an ImageFolder root with train/ and val/")
        return root
    root = Path(args.runs) / "data"
    if not (root / "test").is_dir():
        from mtkd.tasks.classify.cli import make_classify_data

        make_classify_data(root, n_classes=args.classes, n_per_class=args.per_class,
                           n_test_per_class=args.test_per_class, imgsz=args.imgsz, seed=0)
    return root


def run_classify(args: argparse.Namespace, res: common.Results, data: Path) -> bool:
    """Teacher, plain and every loss; False when the teacher is not clearly better (nothing distilled)."""
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import evaluate_checkpoint

    from mtkd.tasks.classify.data import compute_mean_std

    mean, std = compute_mean_std(data / "train", args.imgsz)  # once, not in each of the ~70 runs
    base = [f"data.root={_q(str(data))}", f"data.imgsz={args.imgsz}", f"data.mean={_q(mean)}",
            f"data.std={_q(std)}", "train.plots=false", "train.tensorboard=false"] + list(args.set)
    runs = Path(args.runs)
    teacher_arch = [f"model.backbone={_q(args.teacher_arch)}"]
    # teacher
    if args.teacher is not None:
        ckpt = Path(args.teacher)
        if not done(res, "teacher", 0):
            def eval_teacher() -> Dict[str, Any]:
                cfg = load_config(TEACHER_CFG, base + teacher_arch)
                rep = evaluate_checkpoint(cfg, ckpt)
                return classify_record("teacher", 0, rep, ckpt.parent, given=str(ckpt))
            run_or_fail(res, "teacher", 0, eval_teacher)
    else:
        ckpt = runs / "teacher_s0" / "best.pt"
        if not done(res, "teacher", 0) or not ckpt.is_file():
            run_or_fail(res, "teacher", 0, lambda: classify_record(
                "teacher", 0, common.run_config(TEACHER_CFG, base + teacher_arch, seed=0, out=runs / "teacher_s0",
                                                epochs=args.teacher_epochs), runs / "teacher_s0"))
    res.payload["teacher"] = {"checkpoint": str(ckpt), "arch": args.teacher_arch,
                              "epochs": None if args.teacher else args.teacher_epochs}
    if not done(res, "teacher", 0):
        return False
    # plain
    common.run_jobs([(("plain", seed, runs / f"plain_s{seed}", {"loss": None}),
                      dict(config=str(PLAIN_CFG), overrides=base, seed=seed, out=str(runs / f"plain_s{seed}"),
                           epochs=args.epochs))
                     for seed in args.seeds if not done(res, "plain", seed)],
                    args.jobs, job_threads(args), job_recorder(res, classify_record, "classify"), desc="plain")
    t_top1 = common.median_of(res.runs, "teacher", "top1")
    p_top1 = common.median_of([r for r in res.runs if "error" not in r], "plain", "top1")
    if t_top1 is None or p_top1 is None or t_top1 - p_top1 < args.min_gap:
        msg = (f"teacher top1 {t_top1} is not {args.min_gap} points above the plain student's median "
               f"{p_top1}: not distilling (train the teacher longer: --teacher-epochs)")
        res.payload["stopped"] = msg
        write(res)
        print(f"[zoo] {msg}", file=sys.stderr)
        return False
    res.payload.pop("stopped", None)
    # losses
    n_train = count_images(data / "train")
    batch = load_config(PLAIN_CFG, base)["train"]["batch"]
    spe = steps_per_epoch(n_train, batch)
    teacher = [f"teacher.ckpt={_q(str(ckpt))}", f"teacher.model={_q({'name': args.teacher_arch})}"]
    jobs = []
    for name, seed in [(name, seed) for name in args.losses for seed in args.seeds]:
        if done(res, name, seed):
            continue
        entry = loss_entry(name, n_train, spe, dense=False, teacher_arch=args.teacher_arch)
        extra = [{"name": "ce", "weight": 1.0}, entry]
        out = runs / f"{name}_s{seed}"
        ov = base + teacher + [f"loss.extra={_q(extra)}"]
        jobs.append(((name, seed, out, {"loss": entry}),
                     dict(config=str(PLAIN_CFG), overrides=ov, seed=seed, out=str(out), epochs=args.epochs)))
    common.run_jobs(jobs, args.jobs, job_threads(args), job_recorder(res, classify_record, "classify"), desc="zoo")
    return True


def run_dense(args: argparse.Namespace, res: common.Results) -> None:
    """The dense-capable losses on the multi-task set (roles ``<name>@dense``)."""
    from mtkd.engine.config import load_config
    from mtkd.engine.tasks import get_task
    from mtkd.engine.trainer import evaluate_checkpoint

    # validated once, after the last epoch: a 3-epoch run's best.pt is its last one anyway
    data = common.data_overrides(args.dense_data) + ["train.plots=false", "train.tensorboard=false",
                                                     f"train.val_every={args.dense_epochs}"]
    data += list(args.dense_set)
    runs = Path(args.runs)
    if not done(res, "teacher@dense", 0):
        run_or_fail(res, "teacher@dense", 0, lambda: common.make_record(
            "teacher@dense", 0, evaluate_checkpoint(load_config(DENSE_TEACHER_CFG, data), args.dense_teacher),
            set="dense", given=str(args.dense_teacher)), set="dense")
    common.run_jobs([(("plain@dense", seed, runs / f"plain_dense_s{seed}", {}),
                      dict(config=str(DENSE_STUDENT_CFG), overrides=data, seed=seed,
                           out=str(runs / f"plain_dense_s{seed}"), epochs=args.dense_epochs))
                     for seed in args.seeds if not done(res, "plain@dense", seed)],
                    args.jobs, job_threads(args), job_recorder(res, dense_record, "dense"), desc="plain dense")
    ok = [r for r in res.runs if "error" not in r]
    t_miou, p_miou = common.median_of(ok, "teacher@dense", "miou"), common.median_of(ok, "plain@dense", "miou")
    if t_miou is None or p_miou is None or t_miou - p_miou < args.dense_min_gap:
        msg = (f"dense teacher miou {t_miou} is not {args.dense_min_gap} above the plain student's median "
               f"{p_miou}: not distilling on the multi-task set")
        res.payload["stopped_dense"] = msg
        print(f"[zoo] {msg}", file=sys.stderr)
        return
    res.payload.pop("stopped_dense", None)
    cfg = load_config(DENSE_STUDENT_CFG, data)
    n_train = len(get_task(cfg["task"]).build_dataset(cfg, "train", True))
    spe = steps_per_epoch(n_train, cfg["train"]["batch"])
    hard = {k: v for k, v in cfg["loss"].items() if k != "extra"}
    teacher = [f"teacher.ckpt={_q(str(args.dense_teacher))}"]
    # seed-major: a sitting cut short still covers every loss once
    plan = [(n, s) for s in args.seeds for n in args.losses if n in DENSE_LOSSES]
    jobs = []
    for name, seed in plan:
        role = f"{name}@dense"
        if done(res, role, seed):
            continue
        entry = loss_entry(name, n_train, spe, dense=True)
        out = runs / f"{name}_dense_s{seed}"
        ov = data + teacher + [f"loss={_q({**hard, 'extra': [entry]})}"]
        jobs.append(((role, seed, out, {"loss": entry}), dict(config=str(DENSE_STUDENT_CFG), overrides=ov,
                                                              seed=seed, out=str(out), epochs=args.dense_epochs)))
    common.run_jobs(jobs, args.jobs, job_threads(args), job_recorder(res, dense_record, "dense"), desc="zoo dense")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from mtkd.env import go_offline

    go_offline()  # offline switches before any library import

    args = parse(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    data = prepare_data(args)
    budget = {"epochs": args.epochs, "teacher_epochs": args.teacher_epochs, "seeds": list(args.seeds),
              "threads": args.threads, "jobs": args.jobs,
              "imgsz": args.imgsz, "dense_epochs": args.dense_epochs if args.dense else None}
    res = common.Results(args.out, "zoo", data=data, budget=budget)
    old = list(res.payload.get("losses", []))
    res.payload["losses"] = old + [n for n in args.losses if n not in old]  # a resumed sitting may add losses
    ok = run_classify(args, res, data)
    if ok and args.dense:
        res.payload["dense_data"] = str(args.dense_data)
        run_dense(args, res)
    write(res)
    print(res.md_path.read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

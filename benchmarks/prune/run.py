#!/usr/bin/env python
"""Benchmark: prune a trained student, recover it by fine-tuning or by distillation, time it in onnxruntime.

Protocol (small testbed by default: ``data/small``, ``mtkd/configs/small/``):

* **Inputs.** ``--student``: the plain student at its plateau, the
  ``unpruned`` baseline (default: ``benchmarks/kd_gain``'s plain run of seed
  0, ``benchmarks/kd_gain/runs/plain_s0/best.pt``); ``--teacher``: the
  original teacher (default: the testbed's, ``runs/small/teacher/best.pt``).
  A missing one is trained first, seed 0, into its folder, with
  ``--student-config`` / ``--teacher-config``. Both are evaluated on this
  benchmark's test split (roles ``unpruned`` and ``teacher``).
* **Sizes.** For each share of the unpruned student's FLOPs in ``--sizes``
  (default 0.75 0.5 0.3), the student is pruned once with
  :func:`mtkd.export.prune.prune_checkpoint` and ``target_gflops`` = size x
  its GFLOPs (the channel ratio grows in steps until the model is at or
  below the target; ``--importance``, ``--round-to``, default 1: no
  rounding, because the testbed student's layers are 12 to 48 channels wide
  and multiples of 8 cannot bring it near half its FLOPs). The size 0.5 is
  the one the targets judge; the FLOPs share it reaches is checked against
  0.50 +- 0.05.
* **Roles** at each size (0.5 plain, the others suffixed ``@<size>``):
  ``pruned`` (no recovery, evaluated as pruned); ``finetune`` (the student
  config, ``model.init`` = the pruned checkpoint); ``kd`` (the KD config,
  the unpruned student as ``teacher.ckpt``); ``kd_teacher`` (the KD config,
  the original teacher). ``teacher_pruned``: the teacher pruned to the
  unpruned student's GFLOPs and recovered with the KD config from the
  original teacher, against the student trained from scratch (``unpruned``).
  Every recovery trains ``--recovery`` (0.25) x the plateau steps (the
  student config's epochs x batches per epoch), over ``--seeds`` (0 1 2),
  through ``train.max_steps``, so the schedule ends at the budget.
* **Latency.** Every architecture (the unpruned student and teacher, each
  pruned model) is exported with :func:`mtkd.export.onnx.export_checkpoint`
  (parity-checked against PyTorch) and run in onnxruntime on the CPU with
  ``intra_op_num_threads=1``, at batch 16 and at batch 1, at ``--ort-imgsz``
  (128 px; each exported at that side, as the models are fully convolutional):
  all models timed alternately (:func:`benchmarks.common.interleaved_times`),
  ``--ort-warmup`` untimed runs each, then the median of ``--ort-runs`` (>= 50).
  A run's ``ort_ms`` (batch 16) and ``ort_ms_b1`` are those of its
  architecture (recovery changes weights, not shapes). Latency is measured
  before any training starts, with nothing else of the benchmark running.
  ``onnx_mb``: the size of the FP32 file on disk.
* **INT8** (``--no-int8-row`` skips it). After the recovery runs, the
  unpruned student (role ``unpruned_int8``) and each ``kd`` run (role
  ``int8``, ``int8@<size>``; same seeds) are exported as ``mtkd export
  --int8`` does (:func:`mtkd.export.onnx.export_checkpoint`: the FP32 file,
  parity-checked, then static QDQ INT8 calibrated on ``--int8-calib`` (64)
  training images) into ``<out>/runs/int8``; the export's metric-drop report
  scores both files in onnxruntime on the whole test split with the
  evaluator. The record's metrics are the INT8 file's, ``fp32_<metric>`` the
  FP32 file's, ``drop_<metric>`` their difference, ``onnx_mb`` /
  ``fp32_onnx_mb`` the sizes on disk; ``ort_ms`` / ``ort_ms_b1`` and
  ``fp32_ort_ms`` / ``fp32_ort_ms_b1`` come from one more alternating timing
  of each architecture's INT8 and FP32 files (lowest seed's), as above, once
  nothing else runs. No target is set for INT8: the drop, size and speed-up
  are reported (one derived line per INT8 role).
* **Records** carry, besides the common keys, ``ratio`` (the channel ratio
  reached, 0 unpruned), ``size`` (the FLOPs share aimed at), ``flops_frac``
  (GFLOPs / the unpruned student's), ``ort_ms``, ``ort_ms_b1``, ``onnx_mb``, ``arch``.
* **Targets at half the FLOPs** (``results.md``'s lines, the JSON's
  ``derived`` and ``summary``), for ``kd`` and for ``kd_teacher``: the median
  keeps >= 95 % of the unpruned student's mAP50 and mIoU; the worst seed is
  above the best ``finetune`` seed on both; onnxruntime latency at batch 16
  is >= 1.4x lower than the unpruned model's. Each MET / NOT MET.

``--yolo`` runs the YOLO variant instead, :mod:`benchmarks.prune.yolo` (its
options: ``--yolo --help``).

Recovery runs go ``--jobs`` at a time (default 2 on 2+ cores), one torch
thread each, seed-major so the roles interleave, each into
``<out>/runs/<role>_s<seed>``; pruned checkpoints and ONNX files go to
``<out>/runs/prune_*``. Records go to ``<out>/results.json`` as they finish
and a (role, seed) already there is skipped, so the benchmark resumes across
sittings (``--force`` re-runs everything); a sitting whose steps, pruning
settings, ``--set`` overrides, ``--int8-calib`` or input checkpoints differ
from the stored runs' stops with an error. Several ``--sizes`` in one sitting
are separate rows (``<role>@<size>``); sizes pruned in an earlier sitting
stay in the budget and are timed again with this sitting's.

    python benchmarks/prune/run.py                   # small testbed -> benchmarks/prune/
    python benchmarks/prune/run.py --quick           # tiny data, 2 steps, seconds -> benchmarks/prune/out/quick
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (METRICS, TESTBEDS, Results, add_common_args, cli, default_jobs,  # noqa: E402
                               interleaved_times, median_of, prepare, recorder, run_config, run_jobs,
                               testbed_paths)
from benchmarks.kd_gain.run import file_sha256, teacher_record  # noqa: E402
from benchmarks.kd_unlabeled.run import loader_steps  # noqa: E402

NAME = "prune"
HALF = 0.5
"""The size (share of the unpruned student's FLOPs) the targets judge."""
HALF_TOL = 0.05
"""The pruned student at HALF must land within HALF +- this share of the FLOPs."""
KEEP = 0.95
"""KD recovery must keep this share of the unpruned student's mAP50 and mIoU (median seed)."""
SPEEDUP = 1.4
"""onnxruntime latency at batch 16 must be at least this many times lower than the unpruned student's."""
TARGET_METRICS = ("map50", "miou")
METRIC_NAMES = {"map50_95": "mAP50-95", "map50": "mAP50", "miou": "mIoU"}
RECOVERY_ROLES = ("finetune", "kd", "kd_teacher")
KD_ROLES = ("kd", "kd_teacher")
INT8 = "int8"
"""Role of the INT8 file of the ``kd`` student (``int8@<size>`` at other sizes)."""
UNPRUNED_INT8 = "unpruned_int8"
"""Role of the INT8 file of the unpruned student."""
COST = ("params", "gflops", "ratio", "ort_ms", "ort_ms_b1", "onnx_mb", "steps", "wall_s")
CHECKED = ("steps", "importance", "round_to", "overrides", "student_sha256", "teacher_sha256", "int8_calib")
"""Budget keys that must match the stored runs' for a sitting to add to them."""
QUICK = {"seeds": [0], "sizes": [HALF], "steps": 2, "jobs": 1, "ort_runs": 5, "ort_warmup": 1, "ort_imgsz": 0}
"""What ``--quick`` changes (unless given): one seed, the half size, 2 steps, few timing runs."""
QUICK_SET = ["train.batch=4"]
QUICK_DATA = {"n_train": 16, "n_val": 4, "n_test": 4}


def log(msg: str) -> None:
    print(f"[{NAME}] {msg}", flush=True)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=None, default_data=None, seeds=None)
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small",
                   help="configs and default data/checkpoints: small (default) or large")
    p.add_argument("--student", default=None, metavar="CKPT",
                   help="the plain student at its plateau, trained with --student-config when missing "
                        "(default: benchmarks/kd_gain/runs/plain_s0/best.pt)")
    p.add_argument("--teacher", default=None, metavar="CKPT",
                   help="the original teacher, trained with --teacher-config when missing (default: the testbed's)")
    p.add_argument("--student-config", default=None)
    p.add_argument("--teacher-config", default=None)
    p.add_argument("--kd-config", default=None)
    p.add_argument("--sizes", type=float, nargs="+", default=None,
                   help=f"shares of the unpruned student's FLOPs to prune to (default 0.75 {HALF} 0.3; "
                        f"{HALF} is judged)")
    p.add_argument("--recovery", type=float, default=0.25,
                   help="recovery steps as a share of the plateau steps, the student config's (default 0.25)")
    p.add_argument("--steps", type=int, default=None, help="recovery steps (default: --recovery x the plateau steps)")
    p.add_argument("--importance", choices=("magnitude", "taylor", "lamp"), default="magnitude")
    p.add_argument("--round-to", type=int, default=1,
                   help="channel multiple of pruned layers (default 1: no rounding)")
    p.add_argument("--no-teacher-row", dest="teacher_row", action="store_false",
                   help="skip teacher_pruned (the teacher pruned to the student's FLOPs)")
    p.add_argument("--no-int8-row", dest="int8_row", action="store_false",
                   help=f"skip {INT8} and {UNPRUNED_INT8} (the kd and unpruned students in static INT8)")
    p.add_argument("--int8-calib", type=int, default=None, metavar="N",
                   help="training images calibrating the INT8 ranges (default: mtkd export's, 64)")
    p.add_argument("--ort-runs", type=int, default=None, help="timed onnxruntime runs per model and batch (default 50)")
    p.add_argument("--ort-imgsz", type=int, default=None,
                   help="image side of the latency rows (default 128; --quick: the data's)")
    p.add_argument("--ort-warmup", type=int, default=None, help="untimed runs first (default 5)")
    p.add_argument("--jobs", type=int, default=None,
                   help="recovery runs at a time, one torch thread each (default 2 with 2+ cores, else 1)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds: tiny synthetic data in <out>/data, student and teacher trained "
                        "2 steps, one seed, the half size, 2 recovery steps")
    p.add_argument("--force", action="store_true", help="re-prune, re-time and re-run everything")
    p.add_argument("--yolo", action="store_true",
                   help="the YOLO variant (benchmarks/prune/yolo.py; its options: --yolo --help)")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    small = args.testbed == "small"
    if args.quick:
        args.out = args.out or str(ROOT / "benchmarks/prune/out/quick")
        for key, value in QUICK.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        args.data = args.data or str(Path(args.out) / "data")
        args.student = args.student or str(Path(args.out) / "student" / "best.pt")
        args.teacher = args.teacher or str(Path(args.out) / "teacher" / "best.pt")
        args.set = QUICK_SET + list(args.set)
    kd_gain = ROOT / "benchmarks/kd_gain" / ("" if small else "legacy_128px")
    defaults = {"out": str(ROOT / "benchmarks/prune"), "data": tb["data"], "seeds": [0, 1, 2],
                "student": str(kd_gain / "runs/plain_s0/best.pt"), "teacher": tb["teacher_ckpt"],
                "student_config": tb["student"], "teacher_config": tb["teacher"], "kd_config": tb["kd"],
                "sizes": [0.75, HALF, 0.3], "jobs": default_jobs(), "ort_runs": 50, "ort_warmup": 5,
                "ort_imgsz": 128}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if any(not 0.0 < s < 1.0 for s in args.sizes):
        p.error(f"--sizes: each must be in (0, 1), got {args.sizes}")
    if not 0.0 < args.recovery:
        p.error("--recovery: must be positive")
    if args.steps is not None and args.steps < 1:
        p.error("--steps: must be at least 1")
    if args.int8_calib is not None and args.int8_calib < 1:
        p.error("--int8-calib: must be at least 1")
    if args.ort_runs < 1 or args.ort_warmup < 0:
        p.error("--ort-runs must be at least 1 and --ort-warmup at least 0")
    if args.ort_imgsz < 0 or 0 < args.ort_imgsz < 32 or args.ort_imgsz % 32:
        p.error(f"--ort-imgsz: a multiple of 32 (0: the data's side), got {args.ort_imgsz}")
    return args


# -- names --------------------------------------------------------------------------------------
def role(base: str, size: float) -> str:
    """The role of ``base`` at a size: plain at :data:`HALF`, else ``base@size``."""
    return base if math.isclose(size, HALF) else f"{base}@{size:g}"


def arch_name(model: str, size: Optional[float]) -> str:
    """Name of an architecture (the folder of its pruned checkpoint): ``student``, ``student_f0.50``, ..."""
    return model if size is None else f"{model}_f{size:.2f}"


# -- inputs -------------------------------------------------------------------------------------
def checkpoint_config(ckpt: Path, data_ov: Sequence[str], extra: Sequence[str]) -> Dict[str, Any]:
    """A checkpoint's own config with the benchmark's data and ``--set`` overrides (as
    :func:`benchmarks.kd_gain.run.teacher_record` evaluates it)."""
    from mtkd import checkpoint as ckpt_io
    from mtkd.engine.config import build_config

    own = dict(ckpt_io.load_checkpoint(ckpt)["config"])
    own.pop("out", None)
    return build_config(own, list(data_ov) + ["train.resume=null"] + list(extra))


def ensure_checkpoint(ckpt: Path, config: str, what: str, overrides: List[str]) -> Path:
    """``ckpt``, or a run of ``config`` (seed 0) trained into its folder when it does not exist."""
    if ckpt.is_file():
        return ckpt
    log(f"{ckpt} not found: training the {what} with {config} into {ckpt.parent}")
    run_config(config, overrides, seed=0, out=ckpt.parent)
    return ckpt.parent / "best.pt"


def write_quick_data(path: Path) -> None:
    """The tiny synthetic set of ``--quick`` (the small testbed's generator, few images)."""
    if path.exists():
        return
    from mtkd.datasets.synthetic import TESTBEDS as SETS, make_synthetic

    make_synthetic(path, formats=("voc",), **{**SETS["small"], **QUICK_DATA})


def plateau_steps(config: str, overrides: Sequence[str]) -> Tuple[int, int]:
    """``(steps, batches per epoch)`` of a config's full schedule on its training split."""
    from mtkd.datasets import build_dataset
    from mtkd.engine.config import load_config

    cfg = load_config(config, list(overrides))
    per_epoch = loader_steps(len(build_dataset(cfg["data"], "train", train=False)), int(cfg["train"]["batch"]))
    return int(cfg["train"]["epochs"]) * per_epoch, per_epoch


def recovery_overrides(steps: int, per_epoch: int) -> List[str]:
    """``train.*`` overrides ending the schedule at ``steps`` optimizer steps."""
    return [f"train.epochs={math.ceil(steps / per_epoch)}", f"train.max_steps={int(steps)}"]


# -- pruning ------------------------------------------------------------------------------------
def prune_once(cfg: Dict[str, Any], src: Path, src_digest: str, out: Path, target_gflops: float, importance: str,
               round_to: int, force: bool) -> Dict[str, Any]:
    """``out/best.pt``: ``src`` pruned to ``target_gflops`` (reused when pruned before with the same settings).

    Returns ``mtkd prune``'s report (``out/prune.json``); ``out/bench.json``
    records what it was pruned from and how.
    """
    from mtkd.export.prune import prune_checkpoint

    settings = {"source_sha256": src_digest, "target_gflops": target_gflops, "importance": importance,
                "round_to": round_to}
    stamp, report_path = out / "bench.json", out / "prune.json"
    if (not force and (out / "best.pt").is_file() and report_path.is_file() and stamp.is_file()
            and json.loads(stamp.read_text()) == settings):
        return json.loads(report_path.read_text())
    report = prune_checkpoint(cfg, src, out, target_gflops=target_gflops, importance=importance,
                              round_to=round_to)
    stamp.write_text(json.dumps(settings, indent=2) + "\n")
    return report


# -- latency ------------------------------------------------------------------------------------
def ort_latency(paths: Mapping[str, Path], imgsz: int, runs: int, warmup: int,
                batches: Sequence[int] = (16, 1)) -> Dict[str, Dict[str, float]]:
    """Median onnxruntime latency (ms) of each ``.onnx`` file at each batch size, timed alternately.

    One CPU session per file with one intra-op and one inter-op thread; the
    input is the same random batch for every model. Returns ``{name:
    {"ort_ms_b<B>": ms, ...}}``.
    """
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    out: Dict[str, Dict[str, float]] = {name: {} for name in paths}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal((b, 3, imgsz, imgsz)).astype(np.float32)
        fns = {name: (lambda batch, s=s: s.run(None, {"images": batch["images"]})) for name, s in sessions.items()}
        times = interleaved_times(fns, [{"images": x}] * runs, repeats=1, warmup=warmup)
        for name in paths:
            out[name][f"ort_ms_b{b}"] = 1000.0 * float(np.median(times[name][0]))
    return out


def latency_fields(lat: Optional[Mapping[str, float]], prefix: str = "") -> Dict[str, Optional[float]]:
    """A record's ``ort_ms`` (batch 16) and ``ort_ms_b1`` from its architecture's timings (keys ``prefix`` + ...)."""
    lat = lat or {}
    return {f"{prefix}ort_ms": lat.get("ort_ms_b16"), f"{prefix}ort_ms_b1": lat.get("ort_ms_b1")}


# -- INT8 ---------------------------------------------------------------------------------------
def is_int8(role_: str) -> bool:
    """Whether ``role_`` is an INT8 file's (``int8``, ``int8@<size>``, ``unpruned_int8``)."""
    return role_.split("@")[0] in (INT8, UNPRUNED_INT8)


def int8_export(cfg: Dict[str, Any], ckpt: Path, out: Path, calib: int) -> Dict[str, Any]:
    """``ckpt`` as ``mtkd export --int8`` writes it (:func:`mtkd.export.onnx.export_checkpoint`): ``out``, the FP32
    file checked against PyTorch, and ``<stem>.int8.onnx``, calibrated on the first ``calib`` training images.

    Both files are scored in onnxruntime on the whole test split by the export's
    own parity report (:func:`mtkd.export.quantize.metric_drop`). Returns the
    INT8 report (``path``, ``bytes``, ``fp32_bytes``, ``quantization``,
    ``parity``: ``fp32``, ``int8`` and ``drop`` per metric).
    """
    from mtkd.datasets import build_dataset
    from mtkd.export.onnx import export_checkpoint

    n_test = len(build_dataset(cfg["data"], "test", train=False))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = export_checkpoint(cfg, ckpt, out, int8=True, calib=calib, parity_images=max(1, n_test),
                               parity_split="test")
    return report["int8"]


def int8_record(role_: str, source: Mapping[str, Any], q: Mapping[str, Any], secs: float) -> Dict[str, Any]:
    """The record of an INT8 file: its test metrics, ``fp32_<metric>`` (the FP32 file's, same path) and
    ``drop_<metric>`` (FP32 - INT8), file sizes in MB, and the source run's seed, steps and architecture."""
    par = q["parity"]
    rec: Dict[str, Any] = {k: source.get(k) for k in ("seed", "epochs", "steps", "params", "gflops", "ratio",
                                                      "size", "arch")}
    rec.update(role=role_, source_role=source["role"], wall_s=None, export_s=secs, split=par["split"],
               test_images=par["images"], onnx=q["path"], fp32_onnx=q["fp32_path"], onnx_mb=q["bytes"] / 1e6,
               fp32_onnx_mb=q["fp32_bytes"] / 1e6, calib_images=q["quantization"]["calib_images"])
    for m in METRICS:
        rec[m], rec[f"fp32_{m}"], rec[f"drop_{m}"] = par["int8"].get(m), par["fp32"].get(m), par["drop"].get(m)
    return rec


def int8_sources(runs: Sequence[Mapping[str, Any]]) -> List[Tuple[str, Mapping[str, Any]]]:
    """``(INT8 role, source record)``: the unpruned student and every ``kd`` run, at every size."""
    out: List[Tuple[str, Mapping[str, Any]]] = [(UNPRUNED_INT8, r) for r in runs if r["role"] == "unpruned"]
    out += [(role(INT8, float(r["size"])), r) for r in runs
            if r["role"].split("@")[0] == "kd" and r.get("size") is not None]
    return out


# -- verdicts -----------------------------------------------------------------------------------
def _values(runs: Sequence[Mapping[str, Any]], role_: str, key: str) -> List[float]:
    return [float(r[key]) for r in runs if r["role"] == role_ and isinstance(r.get(key), (int, float))]


def _f(v: Optional[float], spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _met(ok: Optional[bool]) -> str:
    return "not yet measurable" if ok is None else ("MET" if ok else "NOT MET")


def verdicts(runs: Sequence[Mapping[str, Any]]) -> Tuple[List[str], Dict[str, Any]]:
    """Derived lines and a machine-readable summary: the half-FLOPs check, the three targets
    for ``kd`` and ``kd_teacher``, the other sizes and the teacher row."""
    lines: List[str] = []
    summary: Dict[str, Any] = {"targets": {}}
    base = {m: median_of(runs, "unpruned", m) for m in METRICS}
    base_ms = median_of(runs, "unpruned", "ort_ms")
    frac = median_of(runs, "pruned", "flops_frac")
    if frac is None:
        lines.append(f"half FLOPs: not yet measurable (no pruned student at size {HALF})")
    else:
        ok = abs(frac - HALF) <= HALF_TOL + 1e-9
        summary["half_flops"] = {"flops_frac": frac, "ratio": median_of(runs, "pruned", "ratio"), "in_window": ok}
        lines.append(f"half FLOPs: the pruned student has {frac:.3f} of the unpruned GFLOPs at channel ratio "
                     f"{_f(summary['half_flops']['ratio'], '.2f')} (window {HALF} +- {HALF_TOL}: "
                     f"{'in' if ok else 'OUT'})")
    pruned_ms = median_of(runs, "pruned", "ort_ms")
    speedup = base_ms / pruned_ms if base_ms and pruned_ms else None
    speed_ok = None if speedup is None else speedup >= SPEEDUP
    b1 = median_of(runs, "unpruned", "ort_ms_b1"), median_of(runs, "pruned", "ort_ms_b1")
    summary["ort_speedup_b16"] = speedup
    summary["ort_speedup_b1"] = b1[0] / b1[1] if all(b1) else None
    lines.append(f"onnxruntime, 1 thread, batch 16: unpruned {_f(base_ms, '.3f')} ms, pruned {_f(pruned_ms, '.3f')} ms "
                 f"({_f(speedup, '.2f')}x lower; batch 1 {_f(summary['ort_speedup_b1'], '.2f')}x) "
                 f"(target >= {SPEEDUP}x: {_met(speed_ok)})")
    for r in ("pruned",) + RECOVERY_ROLES:
        parts = []
        for m in TARGET_METRICS:
            med = median_of(runs, r, m)
            share = med / base[m] if med is not None and base[m] else None
            parts.append(f"{METRIC_NAMES[m]} {_f(med)} / {_f(base[m])} = {_f(share, '.1%')}")
        lines.append(f"median {r} vs unpruned: " + ", ".join(parts))
    for r in KD_ROLES:
        keep: Dict[str, Optional[bool]] = {}
        above: Dict[str, Optional[bool]] = {}
        parts = []
        for m in TARGET_METRICS:
            kd, ft = _values(runs, r, m), _values(runs, "finetune", m)
            med = median_of(runs, r, m)
            keep[m] = None if med is None or not base[m] else med >= KEEP * base[m]
            above[m] = None if not kd or not ft else min(kd) > max(ft)
            parts.append(f"{METRIC_NAMES[m]} {_f(min(kd) if kd else None)} vs {_f(max(ft) if ft else None)}")
        t = {f"keeps >= {KEEP:.0%} of unpruned": _all(keep.values()),
             "worst seed above best finetune seed": _all(above.values()),
             f"onnxruntime batch 16 >= {SPEEDUP}x lower": speed_ok}
        summary["targets"][r] = t
        lines.append(f"target ({r}): median keeps >= {KEEP:.0%} of the unpruned mAP50 and mIoU: "
                     f"{_met(t[f'keeps >= {KEEP:.0%} of unpruned'])}")
        lines.append(f"target ({r}): worst {r} seed above best finetune seed on mAP50 and mIoU ("
                     + ", ".join(parts) + f"): {_met(t['worst seed above best finetune seed'])}")
    for size in sorted({float(r["size"]) for r in runs if r.get("size") is not None}, reverse=True):
        if math.isclose(size, HALF) or not _values(runs, role("pruned", size), "map50"):
            continue
        parts = []
        for r in ("pruned",) + RECOVERY_ROLES:
            med = [median_of(runs, role(r, size), m) for m in TARGET_METRICS]
            parts.append(f"{r} {_f(med[0], '.3f')} / {_f(med[1], '.3f')}")
        lines.append(f"size {size:g} ({_f(median_of(runs, role('pruned', size), 'flops_frac'), '.3f')} of the FLOPs, "
                     f"ort batch 16 {_f(median_of(runs, role('pruned', size), 'ort_ms'), '.3f')} ms), median mAP50 / "
                     "mIoU: " + "; ".join(parts))
    if _values(runs, "teacher_pruned", "map50"):
        med = {m: median_of(runs, "teacher_pruned", m) for m in METRICS}
        parts = [f"{METRIC_NAMES[m]} {_f(med[m])} vs {_f(base[m])}" for m in METRICS]
        better = {m: None if med[m] is None or base[m] is None else med[m] > base[m] for m in METRICS}
        summary["teacher_pruned_above_student"] = better
        lines.append(f"teacher pruned to the student's FLOPs ({_f(median_of(runs, 'teacher_pruned', 'gflops'), '.4f')} "
                     f"vs {_f(median_of(runs, 'unpruned', 'gflops'), '.4f')} GFLOPs; ort batch 16 "
                     f"{_f(median_of(runs, 'teacher_pruned', 'ort_ms'), '.3f')} vs {_f(base_ms, '.3f')} ms) and "
                     "recovered with KD, median vs the student trained from scratch: " + ", ".join(parts))
    more, summary["int8"] = int8_lines(runs)
    return lines + more, summary


def int8_lines(runs: Sequence[Mapping[str, Any]]) -> Tuple[List[str], Dict[str, Any]]:
    """One line per INT8 role: median FP32 -> INT8 test metrics and per-seed drop, file sizes, and the
    onnxruntime latency of the two files timed side by side. No target is set for these; they are reported."""
    lines: List[str] = []
    summary: Dict[str, Any] = {}
    for r in sorted({x["role"] for x in runs if is_int8(x["role"])}, key=lambda x: (x != UNPRUNED_INT8, x)):
        med = {k: median_of(runs, r, k) for k in ("onnx_mb", "fp32_onnx_mb", "ort_ms", "fp32_ort_ms", "ort_ms_b1",
                                                   "fp32_ort_ms_b1", "calib_images", "test_images")}
        per = {m: {"fp32": median_of(runs, r, f"fp32_{m}"), "int8": median_of(runs, r, m),
                   "drop": median_of(runs, r, f"drop_{m}")} for m in METRICS}
        ratio = {"size": (med["onnx_mb"], med["fp32_onnx_mb"]), "b16": (med["fp32_ort_ms"], med["ort_ms"]),
                 "b1": (med["fp32_ort_ms_b1"], med["ort_ms_b1"])}
        ratio = {k: a / b if a and b else None for k, (a, b) in ratio.items()}
        summary[r] = {"metrics": per, "size_ratio": ratio["size"], "speedup_b16": ratio["b16"],
                      "speedup_b1": ratio["b1"]}
        seeds = ",".join(str(x["seed"]) for x in runs if x["role"] == r)
        src = "unpruned student" if r == UNPRUNED_INT8 else f"kd student at size {r.partition('@')[2] or HALF}"
        drops = ", ".join(f"{METRIC_NAMES[m]} {_f(per[m]['fp32'])} -> {_f(per[m]['int8'])} "
                          f"(drop {_f(per[m]['drop'], '+.4f')})" for m in METRICS)
        lines.append(f"{r}: the {src} (seeds {seeds}) in static INT8 (QDQ, {_f(med['calib_images'], '.0f')} train "
                     f"images calibrate), {_f(med['test_images'], '.0f')} test images in onnxruntime, median FP32 -> "
                     f"INT8 {drops}; file {_f(med['onnx_mb'], '.3f')} vs {_f(med['fp32_onnx_mb'], '.3f')} MB "
                     f"({_f(ratio['size'], '.2f')}x); 1 thread, timed side by side: batch 16 "
                     f"{_f(med['ort_ms'], '.3f')} vs {_f(med['fp32_ort_ms'], '.3f')} ms (speed-up "
                     f"{_f(ratio['b16'], '.2f')}x), batch 1 {_f(med['ort_ms_b1'], '.3f')} vs "
                     f"{_f(med['fp32_ort_ms_b1'], '.3f')} ms "
                     f"({_f(ratio['b1'], '.2f')}x) (no target: reported)")
    return lines, summary


def _all(values: Any) -> Optional[bool]:
    values = list(values)
    return None if any(v is None for v in values) else all(values)


# -- main ---------------------------------------------------------------------------------------
def all_sizes(path: Path, sizes: Sequence[float], force: bool) -> List[float]:
    """This sitting's ``sizes`` and those of the stored runs (unless ``force``), largest first."""
    earlier = [] if force or not path.is_file() else json.loads(path.read_text()).get("budget", {}).get("sizes", [])
    return sorted(set(sizes) | set(earlier), reverse=True)


def check_previous(path: Path, budget: Mapping[str, Any], force: bool) -> None:
    """Stop when the stored runs used other settings or inputs (unless ``force``)."""
    if force or not path.is_file():
        return
    prev = json.loads(path.read_text()).get("budget", {})
    for key in CHECKED:
        if key in prev and prev[key] != budget[key]:
            raise SystemExit(f"[{NAME}] {path}: its runs used {key}={prev[key]!r}, this sitting {budget[key]!r}; "
                             "use the same settings and checkpoints, another --out, or --force")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--yolo" in argv:
        from benchmarks.prune import yolo

        return yolo.main(argv)
    args = parse(argv)
    from mtkd.errors import MtkdError
    from mtkd.export.quantize import DEFAULT_CALIB

    calib = DEFAULT_CALIB if args.int8_calib is None else args.int8_calib

    if args.quick:
        write_quick_data(Path(args.data))
    data_ov, extra = prepare(args)
    first = ["train.epochs=1", "train.max_steps=2"] if args.quick else []
    student = ensure_checkpoint(Path(args.student), args.student_config, "student", data_ov + extra + first)
    teacher = ensure_checkpoint(Path(args.teacher), args.teacher_config, "teacher", data_ov + extra + first)
    plateau, per_epoch = plateau_steps(args.student_config, data_ov + extra)
    steps = args.steps or max(1, round(args.recovery * plateau))
    digests = {"student": file_sha256(student), "teacher": file_sha256(teacher)}
    results_path = Path(args.out) / "results.json"
    budget = {"testbed": args.testbed, "plateau_steps": plateau, "steps": steps,
              "sizes": all_sizes(results_path, args.sizes, args.force),
              "seeds": list(args.seeds), "importance": args.importance, "round_to": args.round_to,
              "overrides": extra, "student_sha256": digests["student"], "teacher_sha256": digests["teacher"],
              "ort_runs": args.ort_runs, "ort_warmup": args.ort_warmup, "ort_imgsz": args.ort_imgsz,
              "jobs": args.jobs, "quick": args.quick,
              "int8_calib": calib}
    check_previous(results_path, budget, args.force)
    res = Results(args.out, NAME, data=args.data, budget=budget, metrics=METRICS, cost=COST,
                  student=str(student), teacher=str(teacher), kd_config=args.kd_config,
                  student_config=args.student_config)
    if args.force:
        for key in ("latency", "pruning", "onnx_mb", "int8_latency"):
            res.payload[key] = {}
        res.payload["runs"] = []
    latency: Dict[str, Dict[str, float]] = res.payload.setdefault("latency", {})
    pruning: Dict[str, Dict[str, Any]] = res.payload.setdefault("pruning", {})
    onnx_mb: Dict[str, float] = res.payload.setdefault("onnx_mb", {})
    int8_latency: Dict[str, Dict[str, Dict[str, float]]] = res.payload.setdefault("int8_latency", {})

    def refresh() -> None:
        lines, summary = verdicts(res.runs)
        res.write(derived=lines, summary=summary)

    # the references and the pruned models: all architectures exist before anything is timed
    ckpts: Dict[str, Path] = {"student": student, "teacher": teacher}
    cfgs = {name: checkpoint_config(path, data_ov, extra) for name, path in ckpts.items()}
    refs = {"unpruned": "student", "teacher": "teacher"}
    for r, name in refs.items():
        if not any(x["role"] == r for x in res.runs):
            res.add(dict(teacher_record(ckpts[name], data_ov, extra), role=r), write=False)
    student_gflops = median_of(res.runs, "unpruned", "gflops")
    sources = [("student", size, student_gflops * size) for size in args.sizes]
    if args.teacher_row:
        sources.append(("teacher", None, student_gflops))
    pruned: Dict[str, Dict[str, Any]] = {}  # arch -> {ckpt, size, model, report}
    for model, size, target in sources:
        arch = arch_name(model, size) if size is not None else "teacher_pruned"
        out = Path(args.out) / "runs" / f"prune_{arch}"
        try:
            report = prune_once(cfgs[model], ckpts[model], digests[model], out, target, args.importance,
                                args.round_to, args.force)
        except MtkdError as exc:  # an unreachable target is reported, the other sizes go on
            log(f"{arch}: not pruned: {exc}")
            pruning[arch] = {"error": str(exc), "target_gflops": target}
            continue
        pruning[arch] = dict(report, target_gflops=target)
        pruned[arch] = {"ckpt": out / "best.pt", "size": size, "model": model, "report": report}
        log(f"{arch}: {report['gflops_after'] / report['gflops_before']:.3f} of the FLOPs of {model} "
            f"(channel ratio {report['channel_ratio']}), {report['params_after']:,} params")
        if size is not None and not any(x["role"] == role("pruned", size) for x in res.runs):
            res.add(dict(teacher_record(out / "best.pt", data_ov, extra), role=role("pruned", size)), write=False)

    def extras(arch: str, ratio: float, size: Optional[float]) -> Dict[str, Any]:
        return {"arch": arch, "ratio": ratio, "size": size, **latency_fields(latency.get(arch))}

    def enrich(rec: Dict[str, Any]) -> Dict[str, Any]:
        if is_int8(rec["role"]):  # the INT8 file and its FP32 file, timed side by side
            lat = int8_latency.get(rec.get("arch"), {})
            more = {**latency_fields(lat.get("int8")), **latency_fields(lat.get("fp32"), "fp32_")}
        else:
            more = latency_fields(latency.get(rec.get("arch")))
            more["onnx_mb"] = onnx_mb.get(rec.get("arch"))
        if rec.get("gflops") is not None and student_gflops:
            more["flops_frac"] = float(rec["gflops"]) / student_gflops
        return more

    arch_of = {"unpruned": ("student", 0.0, None), "teacher": ("teacher", 0.0, None)}
    for arch, p in pruned.items():
        if p["size"] is not None:
            arch_of[role("pruned", p["size"])] = (arch, p["report"]["channel_ratio"], p["size"])
    for rec in res.runs:
        if rec["role"] in arch_of:
            rec.update(extras(*arch_of[rec["role"]]))

    # latency: every architecture, timed alternately, before the recovery runs load the CPUs
    archs = {"student": student, "teacher": teacher, **{a: p["ckpt"] for a, p in pruned.items()}}
    for arch, info in pruning.items():  # pruned in an earlier sitting: timed with the others
        ckpt = Path(args.out) / "runs" / f"prune_{arch}" / "best.pt"
        if arch not in archs and "error" not in info and ckpt.is_file():
            archs[arch] = ckpt
    imgsz = args.ort_imgsz or int(cfgs["student"]["data"]["imgsz"])
    timing = {"runs": args.ort_runs, "warmup": args.ort_warmup, "archs": sorted(archs), "imgsz": imgsz}
    if args.force or res.payload.get("latency_settings") != timing:
        from mtkd.export.onnx import export_checkpoint

        onnx_paths = {}
        for arch, ckpt in archs.items():
            cfg = copy.deepcopy(cfgs["teacher" if arch.startswith("teacher") else "student"])
            cfg["data"]["imgsz"] = imgsz
            onnx_paths[arch] = Path(args.out) / "runs" / "onnx" / f"{arch}.onnx"
            export_checkpoint(cfg, ckpt, onnx_paths[arch])
        log(f"timing {len(archs)} models in onnxruntime (1 thread, batch 16 and 1, {imgsz} px, "
            f"{args.ort_runs} runs after {args.ort_warmup} warm-up)")
        latency.clear()
        latency.update(ort_latency(onnx_paths, imgsz, args.ort_runs, args.ort_warmup))
        res.payload["latency_settings"] = timing
    for arch in archs:
        path = Path(args.out) / "runs" / "onnx" / f"{arch}.onnx"
        if path.is_file():
            onnx_mb[arch] = path.stat().st_size / 1e6
    for rec in res.runs:
        rec.update(enrich(rec))
    refresh()

    # recovery runs, seed-major
    record = recorder(res, NAME, refresh, enrich)
    b_ov = recovery_overrides(steps, per_epoch)
    jobs = []
    for seed in args.seeds:
        for arch, p in pruned.items():
            init = [f"model.init={json.dumps(str(p['ckpt']))}"]
            plan: List[Tuple[str, str, List[str]]] = []
            if p["size"] is None:
                plan.append(("teacher_pruned", args.kd_config, [f"teacher.ckpt={json.dumps(str(teacher))}"]))
            else:
                plan += [(role("finetune", p["size"]), args.student_config, []),
                         (role("kd", p["size"]), args.kd_config, [f"teacher.ckpt={json.dumps(str(student))}"]),
                         (role("kd_teacher", p["size"]), args.kd_config, [f"teacher.ckpt={json.dumps(str(teacher))}"])]
            for r, config, ov in plan:
                if res.has(r, seed) and not args.force:
                    continue
                out = res.run_dir(r, seed)
                more = dict(extras(arch, p["report"]["channel_ratio"], p["size"]), budget_steps=steps,
                            init=str(p["ckpt"]))
                jobs.append(((r, seed, out, more),
                             {"config": config, "overrides": data_ov + ov + init + extra + b_ov, "seed": seed,
                              "out": str(out), "epochs": None}))
    log(f"{len(jobs)} recovery runs of {steps} steps ({args.recovery:g} x {plateau} plateau steps)")
    run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc=NAME)

    # INT8: the unpruned student and every kd run, exported as mtkd export --int8 does, then each architecture's
    # INT8 and FP32 files timed side by side, with nothing else of the benchmark running
    if args.int8_row:
        int8_dir = Path(args.out) / "runs" / "int8"
        for r, src in int8_sources(res.runs):
            if res.has(r, src["seed"]) and not args.force:
                continue
            ckpt = Path(src["checkpoint"]) if src.get("checkpoint") else Path(src["out"]) / "best.pt"
            name = f"{src['role'].replace('@', '_at_')}_s{int(src['seed'])}"
            log(f"{r} seed {src['seed']}: INT8 export of {ckpt}")
            t0 = time.perf_counter()
            try:
                q = int8_export(checkpoint_config(ckpt, data_ov, extra), ckpt, int8_dir / f"{name}.onnx", calib)
            except MtkdError as exc:  # reported; the other files go on
                log(f"{r} seed {src['seed']}: not quantised: {exc}")
                continue
            res.add(int8_record(r, src, q, time.perf_counter() - t0), write=False)
        files: Dict[str, Dict[str, str]] = {}
        for rec in sorted((x for x in res.runs if is_int8(x["role"])), key=lambda x: int(x["seed"])):
            files.setdefault(rec["arch"], {"fp32": rec["fp32_onnx"], "int8": rec["onnx"]})
        timing = {"runs": args.ort_runs, "warmup": args.ort_warmup, "files": files}
        if files and (args.force or res.payload.get("int8_latency_settings") != timing):
            paths = {f"{arch}.{kind}": Path(f[kind]) for arch, f in files.items() for kind in ("fp32", "int8")}
            imgsz = int(cfgs["student"]["data"]["imgsz"])
            log(f"timing {len(paths)} INT8 and FP32 files in onnxruntime (1 thread, batch 16 and 1, {imgsz} px)")
            lat = ort_latency(paths, imgsz, args.ort_runs, args.ort_warmup)
            int8_latency.clear()
            int8_latency.update({arch: {kind: lat[f"{arch}.{kind}"] for kind in ("fp32", "int8")} for arch in files})
            res.payload["int8_latency_settings"] = timing
        for rec in res.runs:
            rec.update(enrich(rec))
        refresh()

    lines, summary = verdicts(res.runs)
    return res.finish(lines, summary=summary)


if __name__ == "__main__":
    cli(main, NAME)

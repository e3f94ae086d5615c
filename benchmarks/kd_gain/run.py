#!/usr/bin/env python
"""Benchmark: what distillation buys a multi-task student (detection + segmentation).

Protocol (the issue's, binding):

* Roles: ``teacher`` (trained once, reused: ``--teacher-ckpt``; evaluated on
  this benchmark's test split), ``plain`` (``mtkd/configs/synthetic_student.yaml``)
  and ``kd`` (``mtkd/configs/synthetic_kd.yaml``), the students over ``--seeds``
  (default 0 1 2) at the same number of epochs (the literature's convention).
* ``kd@wall`` (``--equal-wallclock``, on by default): the distilled student
  again, with ``train.time_budget_s`` = the training wall-clock of the
  ``plain`` run of the same seed, because the teacher's forward pass costs
  steps. Reported beside the equal-epoch figures; targets do not apply.
* Ablation (``--ablation``, on by default, one seed: the first of
  ``--seeds``): ``abl:<name>`` for each ``mtkd/configs/ablation/<name>.yaml``
  (seg_kl, det_mse, feat_gan, cwd alone; ``all`` = the kd config plus the
  feature-GAN, which the kd default leaves out).
* Verdicts (``results.md``'s lines, also in the JSON's ``derived``):
  the teacher premise (teacher - median plain >= 0.10 mAP50 and >= 0.10
  mIoU; until it holds no KD claim counts), the fraction of the
  teacher-student gap closed per metric by the median KD seed (target:
  >= 0.5 on mAP50 and mIoU), and "worst KD seed above best plain seed" per
  metric. Both targets are judged at equal epochs.
* Partial labels: the default data (``mtkd make-synthetic ... --seg-missing
  0.33``) lacks segmentation labels on a third of the training images; their
  hard seg loss is masked and only ``seg_kl`` (teacher) supervises them. The
  counts are read from the data and written to the JSON
  (``partial_labels``); ``abl:seg_kl`` vs ``plain`` isolates that effect.

Every run is trained in-process by :func:`mtkd.engine.trainer.train` into
``<out>/runs/<role>_s<seed>``; records go to ``<out>/results.json`` as they
finish, and a (role, seed) already there is skipped, so the benchmark
resumes across sittings (``--force`` re-runs); a sitting whose epochs,
``--set`` overrides or teacher differ from the stored runs' stops with an
error instead of mixing them. The teacher checkpoint's SHA-256 is stored
(``teacher_sha256``): when the file at the same path has other weights (a
teacher trained on), the teacher, KD and ablation runs move to the JSON's
``superseded`` list and are re-run, and the plain runs, which never load the
teacher, are kept. A missing ``--teacher-ckpt``
is trained first with ``mtkd/configs/synthetic_teacher.yaml`` (``--teacher-epochs``).

Full run (lead)::

    python benchmarks/kd_gain/run.py --data data/synthetic \\
        --teacher-ckpt runs/demo/teacher/best.pt --out benchmarks/kd_gain

Tiny check::

    python benchmarks/kd_gain/run.py --data /tmp/d --teacher-ckpt /tmp/t/best.pt \\
        --out /tmp/kdg --epochs 1 --seeds 0 --no-ablation --set data.imgsz=64
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (Results, add_common_args, data_overrides, gap_closed,  # noqa: E402
                               make_record, median_of, progress, run_record)

ABLATIONS = ("seg_kl", "det_mse", "feat_gan", "cwd", "all")
PREMISE = 0.10
"""The teacher must beat the median plain student by this much on mAP50 and mIoU."""
TARGET_GAP = 0.5
"""The median KD seed must close at least this fraction of the gap (equal epochs)."""
TASK_METRICS: Tuple[Tuple[str, str], ...] = (("det", "map50_95"), ("det", "map50"), ("seg", "miou"))


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out="benchmarks/kd_gain")
    p.add_argument("--teacher-ckpt", default="runs/demo/teacher/best.pt",
                   help="teacher checkpoint to reuse (trained with --teacher-config when missing)")
    p.add_argument("--teacher-config", default=str(ROOT / "mtkd/configs/synthetic_teacher.yaml"))
    p.add_argument("--teacher-epochs", type=int, default=25, help="epochs when the teacher must be trained")
    p.add_argument("--student-config", default=str(ROOT / "mtkd/configs/synthetic_student.yaml"))
    p.add_argument("--kd-config", default=str(ROOT / "mtkd/configs/synthetic_kd.yaml"))
    p.add_argument("--ablation-dir", default=str(ROOT / "mtkd/configs/ablation"))
    p.add_argument("--epochs", type=int, default=10, help="student epochs, every role (default 10)")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="run the one-seed loss ablation (default on)")
    p.add_argument("--ablations", nargs="+", default=list(ABLATIONS), help="which ablation configs")
    p.add_argument("--equal-wallclock", action=argparse.BooleanOptionalAction, default=True,
                   help="also run kd@wall: KD with the plain run's training wall-clock (default on)")
    p.add_argument("--teacher-changed", action="store_true",
                   help="the teacher at --teacher-ckpt was retrained since an older results.json (written before "
                        "teachers were hashed): move its teacher-dependent runs to 'superseded' and re-run them")
    p.add_argument("--force", action="store_true", help="re-run (role, seed) pairs already in results.json")
    return p.parse_args(argv)


# -- the teacher --------------------------------------------------------------------------------
def teacher_record(ckpt: Path, data_ov: List[str], extra_ov: List[str]) -> Dict[str, Any]:
    """The teacher's record: its checkpoint evaluated on this benchmark's test split.

    The model comes from the checkpoint's own config; ``epochs``/``steps`` from
    the checkpoint, ``wall_s`` from the ``test_metrics.json`` beside it when
    present. ``seed`` is the teacher run's seed.
    """
    from mtkd.engine import checkpoint as ckpt_io
    from mtkd.engine.config import build_config
    from mtkd.engine.trainer import evaluate_checkpoint

    ck = ckpt_io.load_checkpoint(ckpt)
    own = dict(ck["config"])
    own.pop("out", None)
    cfg = build_config(own, data_ov + ["train.resume=null"] + extra_ov)
    report = evaluate_checkpoint(cfg, ckpt, "test")
    side = ckpt.parent / "test_metrics.json"
    wall = json.loads(side.read_text()).get("train_wall_s") if side.is_file() else None
    report.update({"epochs_run": ck.get("epoch"), "steps": ck.get("step"), "train_wall_s": wall})
    return make_record("teacher", int(own.get("seed", 0)), report, out=str(ckpt.parent), checkpoint=str(ckpt))


def ensure_teacher(args: argparse.Namespace, data_ov: List[str]) -> Path:
    """``--teacher-ckpt``, trained first (into its folder) when it does not exist."""
    ckpt = Path(args.teacher_ckpt)
    if ckpt.is_file():
        return ckpt
    from benchmarks.common import run_config

    print(f"[kd_gain] {ckpt} not found: training a teacher ({args.teacher_epochs} epochs) into {ckpt.parent}")
    run_config(args.teacher_config, data_ov + list(args.set), seed=0, out=ckpt.parent,
               epochs=args.teacher_epochs)
    return ckpt.parent / "best.pt"


# -- partial labels -----------------------------------------------------------------------------
def partial_labels(config: str, data_ov: List[str], extra_ov: List[str]) -> Dict[str, int]:
    """Counts of training images without seg / det labels in the benchmark's data."""
    from mtkd.datasets import build_dataset
    from mtkd.engine.config import load_config

    cfg = load_config(config, data_ov + extra_ov)
    ds = build_dataset(cfg["data"], "train", train=False)
    return {"train_images": len(ds.records),
            "without_seg": sum(not r.has_seg for r in ds.records),
            "without_det": sum(not r.has_det for r in ds.records)}


# -- verdicts -----------------------------------------------------------------------------------
def _values(runs: List[Dict[str, Any]], role: str, key: str) -> List[float]:
    return [float(r[key]) for r in runs if r["role"] == role and r.get(key) is not None]


def verdicts(runs: List[Dict[str, Any]], partial: Optional[Dict[str, int]] = None) -> Tuple[List[str], Dict[str, Any]]:
    """Derived lines and a machine-readable summary of the gap/target checks."""
    lines: List[str] = []
    summary: Dict[str, Any] = {"gap_closed": {}, "worst_kd_above_best_plain": {}}
    teacher = {m: median_of(runs, "teacher", m) for _, m in TASK_METRICS}
    plain = {m: median_of(runs, "plain", m) for _, m in TASK_METRICS}
    if partial:
        frac = partial["without_seg"] / max(partial["train_images"], 1)
        lines.append(f"partial labels: {partial['without_seg']}/{partial['train_images']} training images "
                     f"({frac:.0%}) have no seg labels (hard seg loss masked, seg_kl supervises them); "
                     f"{partial['without_det']} have no det labels")
    if any(v is None for v in list(teacher.values()) + list(plain.values())):
        lines.append("teacher premise: not yet measurable (teacher or plain runs missing)")
        return lines, summary
    d50, dmiou = teacher["map50"] - plain["map50"], teacher["miou"] - plain["miou"]
    premise = d50 >= PREMISE and dmiou >= PREMISE
    summary["premise"] = {"map50_margin": d50, "miou_margin": dmiou, "holds": premise}
    lines.append(f"teacher premise (teacher - median plain >= {PREMISE} on mAP50 and mIoU): "
                 f"mAP50 {d50:+.4f}, mIoU {dmiou:+.4f} -> {'HOLDS' if premise else 'FAILS: no KD claim counts'}")
    for role in ("kd", "kd@wall") + tuple(r for r in dict.fromkeys(x["role"] for x in runs) if r.startswith("abl:")):
        if not _values(runs, role, "map50"):
            continue
        parts = []
        for task, m in TASK_METRICS:
            g = gap_closed(teacher[m], plain[m], median_of(runs, role, m))
            summary["gap_closed"].setdefault(role, {})[m] = g
            parts.append(f"{task} {m} {'n/a (no gap)' if g is None else f'{g:+.2f}'}")
        target = ""
        if role == "kd":
            met = all(g is not None and g >= TARGET_GAP
                      for g in (summary["gap_closed"]["kd"][m] for m in ("map50", "miou")))
            summary["half_gap_met"] = met
            target = f" (target >= {TARGET_GAP} on map50 and miou: {'MET' if met else 'NOT MET'})"
        lines.append(f"gap closed by median {role}: " + ", ".join(parts) + target)
    for role in ("kd", "kd@wall"):
        kd_vals = {m: _values(runs, role, m) for _, m in TASK_METRICS}
        if not kd_vals["map50"]:
            continue
        parts = []
        for task, m in TASK_METRICS:
            worst, best = min(kd_vals[m]), max(_values(runs, "plain", m))
            ok = worst > best
            summary["worst_kd_above_best_plain"].setdefault(role, {})[m] = ok
            parts.append(f"{task} {m} {worst:.3f} vs {best:.3f} {'yes' if ok else 'NO'}")
        tag = " (target, equal epochs)" if role == "kd" else " (reported only)"
        lines.append(f"worst {role} seed above best plain seed{tag}: " + ", ".join(parts))
    return lines, summary


def file_sha256(path: Path) -> str:
    """The checkpoint's content hash: a teacher trained on in place keeps its path, not its hash."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def supersede_stale_runs(payload: Dict[str, Any], digest: str, changed: bool = False) -> int:
    """Move the runs that saw another teacher to ``payload["superseded"]``; returns how many moved.

    Stale when the stored ``teacher_sha256`` differs from ``digest`` (or, for a
    file written before hashing, when ``changed`` says so). Plain runs never
    load the teacher and stay; nothing is deleted. Stamps ``digest``.
    """
    stored = payload.get("teacher_sha256")
    moved = 0
    if (stored is not None and stored != digest) or (stored is None and changed):
        old = [r for r in payload.get("runs", []) if r["role"] != "plain"]
        payload.setdefault("superseded", []).append({"teacher_sha256": stored, "runs": old})
        payload["runs"] = [r for r in payload.get("runs", []) if r["role"] == "plain"]
        moved = len(old)
    payload["teacher_sha256"] = digest
    return moved


# -- main ---------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    from mtkd.env import go_offline

    go_offline()  # offline switches first

    data_ov = data_overrides(args.data, args.format)
    extra = list(args.set)
    ckpt = ensure_teacher(args, data_ov)
    partial = partial_labels(args.student_config, data_ov, extra)
    budget = {"epochs": args.epochs, "seeds": args.seeds, "equal_wallclock": args.equal_wallclock,
              "ablation": list(args.ablations) if args.ablation else [], "overrides": extra}
    old = Path(args.out) / "results.json"
    if old.is_file() and not args.force:
        payload = json.loads(old.read_text())
        prev = dict(payload.get("budget", {}), teacher=payload.get("teacher", str(ckpt)))
        for key, now in (("epochs", budget["epochs"]), ("overrides", budget["overrides"]), ("teacher", str(ckpt))):
            if key in prev and prev[key] != now:
                raise SystemExit(f"[kd_gain] {old}: its runs used {key}={prev[key]!r}, this sitting "
                                 f"{now!r}; use the same settings, another --out, or --force")
    digest = file_sha256(ckpt)
    res = Results(args.out, "kd_gain", data=args.data, budget=budget, teacher=str(ckpt),
                  partial_labels=partial)
    moved = supersede_stale_runs(res.payload, digest, args.teacher_changed)
    if moved:
        print(f"[kd_gain] {ckpt} changed since {res.json_path} was written: {moved} teacher-dependent "
              "runs moved to 'superseded' and re-run; plain runs kept")
    teacher_ov = [f"teacher.ckpt={json.dumps(str(ckpt))}"]
    plan: List[Tuple[str, int, str, List[str]]] = [("teacher", -1, "", [])]
    for seed in args.seeds:
        plan.append(("plain", seed, args.student_config, []))
        plan.append(("kd", seed, args.kd_config, teacher_ov))
        if args.equal_wallclock:
            plan.append(("kd@wall", seed, args.kd_config, teacher_ov))
    if args.ablation:
        for name in args.ablations:
            plan.append((f"abl:{name}", args.seeds[0], str(Path(args.ablation_dir) / f"{name}.yaml"), teacher_ov))

    for role, seed, config, ov in progress(plan, desc="kd_gain"):
        if role == "teacher":
            if args.force or not any(r["role"] == "teacher" for r in res.runs):
                res.payload["runs"] = [r for r in res.runs if r["role"] != "teacher"]
                res.add(teacher_record(ckpt, data_ov, extra))
            continue
        if res.has(role, seed) and not args.force:
            continue
        budget_kw: Dict[str, Any] = {"epochs": args.epochs}
        if role == "kd@wall":
            plain = res.get("plain", seed)
            if plain is None or plain.get("wall_s") is None:
                print(f"[kd_gain] kd@wall seed {seed}: no plain run to match, skipped")
                continue
            budget_kw["time_budget_s"] = float(plain["wall_s"])
        rec = run_record(role, config, seed, res.run_dir(role, seed), overrides=data_ov + ov + extra, **budget_kw)
        if "time_budget_s" in budget_kw:
            rec["time_budget_s"] = budget_kw["time_budget_s"]
        res.add(rec)
        lines, summary = verdicts(res.runs, partial)
        res.write(derived=lines, summary=summary)

    lines, summary = verdicts(res.runs, partial)
    res.write(derived=lines, summary=summary)
    print("\n".join(lines))
    print(f"[kd_gain] wrote {res.json_path} and {res.md_path}")
    return res.payload


if __name__ == "__main__":
    main()

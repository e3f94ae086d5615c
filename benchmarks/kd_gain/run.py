#!/usr/bin/env python
"""Benchmark: what distillation buys a multi-task student (detection + segmentation).

Two testbeds (``--testbed``):

* ``small`` (default): the 64-px synthetic set of ``mtkd make-synthetic
  --testbed small`` (written to ``data/small`` when missing) with the
  ``student_small`` / ``teacher_small`` presets (``mtkd/configs/small/``), which
  train in minutes on a CPU; ``benchmarks/plateau`` measures how far from
  their plateau the configs' budgets leave them.
  Defaults: seeds 0-4, the configs' epochs, two one-thread runs at a time.
* ``large``: the 128-px set and presets of ``mtkd/configs/synthetic_*.yaml``;
  its CPU results are in ``benchmarks/kd_gain/legacy_128px/``.

Protocol:

* Roles: ``teacher`` (trained once, reused: ``--teacher-ckpt``; evaluated on
  this benchmark's test split), ``plain`` (the student config) and ``kd``
  (the KD config), the students over ``--seeds`` at the same number of
  epochs; ``kd@2x``: the distilled student at twice the epochs (``--double``,
  default on small, on the first ``--double-seeds`` seeds), to show whether
  KD's result is itself at a plateau.
* ``kd@wall`` (``--equal-wallclock``, on by default): the distilled student
  again, with ``train.time_budget_s`` = the training wall-clock of the
  ``plain`` run of the same seed (the teacher's forward pass costs steps;
  the schedule is sized to the budget). Reported beside the equal-epoch
  figures; targets do not apply.
* Ablation (``--ablation``; on small its own sitting, ``--ablation-seeds``
  seeds, default 3): ``abl:<name>`` for each ``<ablation-dir>/<name>.yaml``
  (each term alone).
* Verdicts (``results.md``'s lines, also in the JSON's ``derived``):
  the teacher premise (teacher - median plain >= 0.10 mAP50 and >= 0.10
  mIoU; until it holds no KD claim counts), the fraction of the
  teacher-student gap closed per metric by the median KD seed, and "worst KD
  seed above best plain seed" per metric, judged at equal epochs on the TEST
  split. KD weights are chosen on the VAL split by ``sweep.py`` with other
  seeds; each record also carries its best epoch's val metrics (``val_*``).
* Partial labels: training images without segmentation or detection labels
  are counted and written to the JSON (``partial_labels``).

Every run trains in a worker process into ``<out>/runs/<role>_s<seed>``;
records go to ``<out>/results.json`` as they finish, and a (role, seed)
already there is skipped, so the benchmark resumes across sittings
(``--force`` re-runs); a sitting whose epochs, ``--set`` overrides or
teacher differ from the stored runs' stops with an error instead of mixing
them. The teacher checkpoint's SHA-256 is stored (``teacher_sha256``): when
the file at the same path has other weights, the teacher, KD and ablation
runs move to the JSON's ``superseded`` list and are re-run, and the plain
runs, which never load the teacher, are kept. A missing ``--teacher-ckpt``
is trained first with the teacher config. ``--reuse RESULTS_JSON`` takes the
plain runs from another sitting with the same data, epochs and overrides.

    python benchmarks/kd_gain/run.py                       # small testbed -> benchmarks/kd_gain/
    python benchmarks/kd_gain/run.py --ablation --no-double --no-equal-wallclock --seeds 0 1 2   # ablation sitting
    python benchmarks/kd_gain/run.py --testbed large --teacher-ckpt runs/demo/teacher/best.pt

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

from benchmarks.common import (TESTBEDS, Results, add_common_args, default_jobs, extra_overrides,  # noqa: E402
                               gap_closed, make_record, median_of, prepare, recorder,
                               reusable_e_runs, run_jobs, testbed_paths)

ABLATIONS = ("seg_kl", "det_mse", "feat_gan", "cwd", "all")
SMALL_ABLATIONS = ("det_mse", "seg_kl", "cwd", "pkd", "mgd")
PREMISE = 0.10
"""The teacher must beat the median plain student by this much on mAP50 and mIoU."""
TARGET_GAP = 0.3
"""The median KD seed must close at least this fraction of the gap (equal epochs) on TARGET_METRICS."""
TARGET_METRICS: Tuple[str, ...] = ("map50_95", "miou")
TASK_METRICS: Tuple[Tuple[str, str], ...] = (("det", "map50_95"), ("det", "map50"), ("seg", "miou"))


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=None, default_data=None, seeds=None)
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small",
                   help="small: the 64-px testbed whose models train in minutes (default); large: the 128-px one")
    p.add_argument("--teacher-ckpt", default=None,
                   help="teacher checkpoint to reuse, trained with --teacher-config when missing "
                        "(default: the testbed's, runs/small/teacher/best.pt or runs/demo/teacher/best.pt)")
    p.add_argument("--teacher-config", default=None)
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs when the teacher must be trained (default: the teacher config's)")
    p.add_argument("--student-config", default=None)
    p.add_argument("--kd-config", default=None)
    p.add_argument("--ablation-dir", default=None)
    p.add_argument("--epochs", type=int, default=None,
                   help="student epochs, every role (default: the student config's on small, 10 on large)")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=None,
                   help="run the loss ablation (default: on for large, off for small, where it is its own "
                        "sitting)")
    p.add_argument("--ablations", nargs="+", default=None, help="which ablation configs")
    p.add_argument("--ablation-seeds", type=int, default=None,
                   help="seeds per ablation term (default 3 on small, 1 on large)")
    p.add_argument("--equal-wallclock", action=argparse.BooleanOptionalAction, default=True,
                   help="also run kd@wall: KD with the plain run's training wall-clock (default on)")
    p.add_argument("--double", action=argparse.BooleanOptionalAction, default=None,
                   help="also run kd@2x: KD with twice the epochs (default on for small)")
    p.add_argument("--double-seeds", type=int, default=2,
                   help="kd@2x runs on this many of the first seeds (default 2)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs at a time, one torch thread each (default 2 on small with 2+ cores, else 1)")
    p.add_argument("--teacher-changed", action="store_true",
                   help="the teacher at --teacher-ckpt was retrained since an older results.json (written before "
                        "teachers were hashed): move its teacher-dependent runs to 'superseded' and re-run them")
    p.add_argument("--force", action="store_true", help="re-run (role, seed) pairs already in results.json")
    p.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                   help="take the plain runs of these seeds from another kd_gain (or plateau: its plain@2x runs "
                        "count at their epochs) results.json made with the same data, epochs and overrides, instead "
                        "of training them again (e.g. to try another teacher)")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    small = args.testbed == "small"
    defaults = {"out": str(ROOT / "benchmarks/kd_gain" / ("" if small else "legacy_128px")),
                "data": tb["data"], "seeds": [0, 1, 2, 3, 4] if small else [0, 1, 2],
                "teacher_ckpt": tb["teacher_ckpt"], "teacher_config": tb["teacher"],
                "student_config": tb["student"], "kd_config": tb["kd"], "ablation_dir": tb["ablation"],
                "epochs": None if small else 10, "ablation": not small,
                "ablations": list(SMALL_ABLATIONS if small else ABLATIONS), "ablation_seeds": 3 if small else 1,
                "double": small, "jobs": default_jobs() if small else 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# -- the teacher --------------------------------------------------------------------------------
def teacher_record(ckpt: Path, data_ov: List[str], extra_ov: List[str]) -> Dict[str, Any]:
    """The teacher's record: its checkpoint evaluated on this benchmark's test split.

    The model comes from the checkpoint's own config; ``epochs``/``steps`` from
    the checkpoint, ``wall_s`` from the ``test_metrics.json`` beside it when
    present. ``seed`` is the teacher run's seed.
    """
    from mtkd import checkpoint as ckpt_io
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

    what = f"{args.teacher_epochs} epochs" if args.teacher_epochs else "the config's epochs"
    print(f"[kd_gain] {ckpt} not found: training a teacher ({what}) into {ckpt.parent}")
    run_config(args.teacher_config, data_ov + extra_overrides(args), seed=0, out=ckpt.parent,
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
    for role in ("kd", "kd@wall", "kd@2x") + tuple(r for r in dict.fromkeys(x["role"] for x in runs) if r.startswith("abl:")):
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
                      for g in (summary["gap_closed"]["kd"][m] for m in TARGET_METRICS))
            summary["gap_target_met"] = met
            target = (f" (target >= {TARGET_GAP} on {' and '.join(TARGET_METRICS)}, aim 0.5: "
                      f"{'MET' if met else 'NOT MET'})")
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
        tag = " (reported only)"
        if role == "kd":
            met = all(summary["worst_kd_above_best_plain"]["kd"][m] for m in TARGET_METRICS)
            summary["worst_seed_target_met"] = met
            tag = f" (target on {' and '.join(TARGET_METRICS)}, equal epochs: {'MET' if met else 'NOT MET'})"
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
def config_epochs(config: str, overrides: Sequence[str]) -> int:
    """``train.epochs`` of a config after ``overrides``."""
    from mtkd.engine.config import load_config

    return int(load_config(config, list(overrides))["train"]["epochs"])


def plan_runs(args: argparse.Namespace, epochs: int, teacher_ov: List[str]) -> List[List[Tuple[str, int, str, List[str], int]]]:
    """The runs as phases of ``(role, seed, config, overrides, epochs)``; a phase may need the one before.

    Phase 1, seed-major so that roles interleave: plain, kd and kd@2x of each
    seed, then the ablation terms; phase 2: kd@wall, whose time budget is the
    wall-clock of the same seed's plain run.
    """
    first: List[Tuple[str, int, str, List[str], int]] = []
    for seed in args.seeds:
        first.append(("plain", seed, args.student_config, [], epochs))
        first.append(("kd", seed, args.kd_config, teacher_ov, epochs))
    if args.double:
        for seed in args.seeds[: args.double_seeds]:
            first.append(("kd@2x", seed, args.kd_config, teacher_ov, 2 * epochs))
    if args.ablation:
        for seed in args.seeds[: args.ablation_seeds]:
            for name in args.ablations:
                first.append((f"abl:{name}", seed, str(Path(args.ablation_dir) / f"{name}.yaml"), teacher_ov, epochs))
    second = [("kd@wall", seed, args.kd_config, teacher_ov, epochs) for seed in args.seeds] if args.equal_wallclock else []
    return [first, second]


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    data_ov, extra = prepare(args)
    ckpt = ensure_teacher(args, data_ov)
    partial = partial_labels(args.student_config, data_ov, extra)
    epochs = args.epochs or config_epochs(args.student_config, data_ov + extra)
    budget = {"testbed": args.testbed, "epochs": epochs, "seeds": args.seeds, "equal_wallclock": args.equal_wallclock,
              "double": args.double, "double_seeds": args.double_seeds, "ablation": list(args.ablations) if args.ablation else [],
              "ablation_seeds": args.ablation_seeds, "overrides": extra, "jobs": args.jobs}
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
                  partial_labels=partial, kd_config=args.kd_config)
    moved = supersede_stale_runs(res.payload, digest, args.teacher_changed)
    if moved:
        print(f"[kd_gain] {ckpt} changed since {res.json_path} was written: {moved} teacher-dependent "
              "runs moved to 'superseded' and re-run; plain runs kept")
    if args.force or not any(r["role"] == "teacher" for r in res.runs):
        res.payload["runs"] = [r for r in res.runs if r["role"] != "teacher"]
        res.add(teacher_record(ckpt, data_ov, extra))

    for rec in reusable_e_runs(args.reuse, args.data, {"plain": epochs}, extra, args.seeds):
        if not res.has("plain", rec["seed"]):
            res.add(dict(rec, reused_from=args.reuse), write=False)

    def refresh() -> None:
        lines, summary = verdicts(res.runs, partial)
        res.write(derived=lines, summary=summary)

    record = recorder(res, "kd_gain", refresh)

    teacher_ov = [f"teacher.ckpt={json.dumps(str(ckpt))}"]
    for phase in plan_runs(args, epochs, teacher_ov):
        jobs = []
        for role, seed, config, ov, ep in phase:
            if res.has(role, seed) and not args.force:
                continue
            more: Dict[str, Any] = {}
            run_ov = data_ov + ov + extra
            if role == "kd@wall":
                plain = res.get("plain", seed)
                if plain is None or plain.get("wall_s") is None:
                    print(f"[kd_gain] kd@wall seed {seed}: no plain run to match, skipped")
                    continue
                more["time_budget_s"] = float(plain["wall_s"])
                run_ov = run_ov + [f"train.time_budget_s={more['time_budget_s']}"]
            out = res.run_dir(role, seed)
            jobs.append(((role, seed, out, more),
                         {"config": config, "overrides": run_ov, "seed": seed, "out": str(out), "epochs": ep}))
        run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc="kd_gain")

    lines, summary = verdicts(res.runs, partial)
    return res.finish(lines, summary=summary)


if __name__ == "__main__":
    main()

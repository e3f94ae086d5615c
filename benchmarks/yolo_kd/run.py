#!/usr/bin/env python
"""Benchmark: distillation into an Ultralytics YOLO student, four ways, several seeds.

Roles (same student, data, epochs, seed and initial weights within a seed):

* ``plain``: Ultralytics fine-tune, no teacher;
* ``ultralytics_kd``: Ultralytics' own ``distill_model=teacher.pt`` (``dis`` default);
* ``mtkd_out``: mtkd output-level KD (``kd_cls kd_dfl kd_obj``, ``kd_feat=0``);
* ``mtkd_out_feat``: mtkd output + neck-feature KD (``kd_feat`` > 0);
* ``plain_wall`` (equal wall-clock): plain, given Ultralytics' ``time=`` budget
  equal to the training-loop time of this seed's ``mtkd_out_feat`` run, so it
  gets the extra epochs KD's cost would have bought.

The teacher (``--teacher-model``, default ``yolov8s.yaml``) is trained once
with plain Ultralytics and reused (``<out>/teacher/weights/last.pt``, or
``--teacher PATH``). Each seed's student starts from one randomly initialised
checkpoint (``init_s<seed>.pt``, built with ``torch.manual_seed(seed)``) that
every role loads, and Ultralytics' ``seed=<seed>`` fixes the data order and
augmentation. Each run is its own subprocess (same threads, clean state);
``wall_s`` times ``trainer.train()`` inside it, ``epoch_s`` is the median of
the training loop's per-epoch times (callbacks on epoch start/end, so
validation is excluded). Metrics are Ultralytics' final validation (of
``best.pt``; with per-epoch validation off that is the last epoch's EMA).

Writes ``<out>/results.json``
(``{"benchmark", "data", "budget", "teacher", "runs": [{role, seed, epochs,
steps, wall_s, epoch_s, map50_95, map50, params, gflops}], "summary"}``) and
``<out>/results.md``. Without ``--data`` the synthetic set is generated with
``mtkd.datasets.make_synthetic`` into ``<out>/data``.

Default budget (the fine-tuning case users run): the teacher (yolov8s, 180
epochs on 200 images at 96 px, 2340 steps) is trained once; the student
(yolov8n) is trained plainly for 60 epochs once (``--pretrain-epochs``,
seed 0) and every role of every seed fine-tunes that checkpoint for 20
epochs. Measured on the 2-core CPU with one thread per run and the machine
shared with one other job: teacher 30 min, pre-training 4.3 min, about 13
min per seed for the five roles, 3 seeds: about 72 min in all, of which the
teacher and the pre-trained student (reused by later invocations with the
same ``--out``, or passed with ``--teacher`` / ``--student-init``) are 34.
With ``--pretrain-epochs 0`` every seed starts from its own random init; 20
epochs from scratch leave every student at the noise floor (mAP50-95 under
0.002), so that set-up compares nothing. Every run, the teacher's included,
gets ``--train-args`` (default ``optimizer=AdamW,lr0=0.002``): Ultralytics'
``optimizer=auto`` picks AdamW at ``lr0 = 0.002 * 5 / (4 + nc)`` for runs
under 10k iterations, 0.000625 for the 12 synthetic classes, and a yolov8s
teacher trained from scratch that way for 60 epochs reached mAP50-95
0.0027. Check that the teacher is clearly better than the students before
reading the comparison.

Resumable: ``<out>/results.json`` is rewritten after every run, and a later
invocation with the same ``--out`` and budget keeps its (role, seed) runs and
runs only the missing ones (so ``--seeds 0`` now, ``--seeds 0,1,2`` later);
a different budget stops with an error instead of mixing runs.

Tiny check: ``python benchmarks/yolo_kd/run.py --out /tmp/b --seeds 0 --epochs 1
--teacher-epochs 1 --pretrain-epochs 1 --n-train 16 --n-val 8 --imgsz 64``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROLES = ("plain", "ultralytics_kd", "mtkd_out", "mtkd_out_feat", "plain_wall")
MTKD_BEST_CANDIDATES = ("mtkd_out", "mtkd_out_feat")


def parse(argv: List[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="YOLO data yaml (default: generate the synthetic set into <out>/data)")
    p.add_argument("--out", default="benchmarks/yolo_kd/out", help="output folder")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--epochs", type=int, default=20, help="student epochs (every role)")
    p.add_argument("--teacher-epochs", type=int, default=180,
                   help="teacher epochs (trained once, reused; 180 = 2340 steps, about 30 min on one CPU thread)")
    p.add_argument("--teacher", help="an existing teacher .pt to reuse instead of training one")
    p.add_argument("--teacher-model", default="yolov8s.yaml", help="teacher architecture")
    p.add_argument("--student", default="yolov8n.yaml", help="student architecture (random init per seed)")
    p.add_argument("--student-init", help="a student .pt every role of every seed starts from (a fine-tune "
                   "benchmark; default: a random init per seed)")
    p.add_argument("--pretrain-epochs", type=int, default=60,
                   help="first train the student plainly for this many epochs (seed 0, once, reused) and start "
                        "every role of every seed from it: the fine-tuning case, with students off the noise floor "
                        "(default 60; 0 = a random init per seed, where 20 epochs stay at the noise floor)")
    p.add_argument("--imgsz", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200, help="synthetic train images (without --data)")
    p.add_argument("--n-val", type=int, default=60, help="synthetic val images (without --data)")
    p.add_argument("--kd", default="kd_cls=0.5,kd_dfl=0.25,kd_obj=0.1,kd_t=2.0",
                   help="mtkd output-level KD args for both mtkd roles")
    p.add_argument("--train-args", default="optimizer=AdamW,lr0=0.002",
                   help="Ultralytics train arguments for every run, teacher and students (comma-separated "
                        "key=value; '' = Ultralytics' defaults). The default replaces optimizer=auto, which "
                        "for runs under 10k iterations picks AdamW at lr0 = 0.002 * 5 / (4 + nc) (0.000625 "
                        "for the 12 synthetic classes), a fine-tuning rate, too low to train from scratch")
    p.add_argument("--kd-feat", type=float, default=1.0, help="kd_feat of the mtkd_out_feat role")
    p.add_argument("--roles", default=",".join(ROLES), help=f"subset of {','.join(ROLES)}")
    p.add_argument("--val", action="store_true", help="validate every epoch (default: only the last)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one training, print its JSON
    return p.parse_args(argv)


def parse_kv(text: str, flag: str) -> Dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}`` (values read as YAML scalars); a bad item names ``flag``."""
    import yaml

    out: Dict[str, Any] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise SystemExit(f"{flag}: '{item}' is not key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


# -- one training run (in its own process) ------------------------------------------------------
def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    if "validate" in spec:
        return validate_one(spec["validate"], spec["overrides"])
    from mtkd.env import go_offline

    go_offline()  # offline switches first
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.torch_utils import get_flops, get_num_params

    from mtkd.yolo.trainer import KDDetectionTrainer

    overrides = dict(spec["overrides"])
    cls = KDDetectionTrainer if any(k.startswith("kd_") for k in overrides) else DetectionTrainer
    trainer = cls(overrides=overrides)
    epoch_times: List[float] = []
    epoch_cpu: List[float] = []
    marks: Dict[str, float] = {}

    def epoch_start(_t: Any) -> None:
        marks["epoch"], marks["epoch_cpu"] = time.perf_counter(), time.process_time()

    def epoch_end(_t: Any) -> None:
        epoch_times.append(time.perf_counter() - marks["epoch"])
        epoch_cpu.append(time.process_time() - marks["epoch_cpu"])

    trainer.add_callback("on_train_start", lambda t: marks.__setitem__("start", time.perf_counter()))
    trainer.add_callback("on_train_epoch_start", epoch_start)
    trainer.add_callback("on_train_epoch_end", epoch_end)
    trainer.add_callback("on_fit_epoch_end", lambda t: marks.__setitem__("loop_end", time.perf_counter()))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    model = trainer.ema.ema
    metrics = trainer.metrics or {}
    epochs = len(epoch_times)
    return {
        "epochs": epochs,
        "steps": epochs * len(trainer.train_loader),
        "wall_s": round(wall, 2),
        "loop_s": round(marks.get("loop_end", t0) - marks.get("start", t0), 2),
        "epoch_s": round(statistics.median(epoch_times), 3) if epoch_times else None,
        "epoch_cpu_s": round(statistics.median(epoch_cpu), 3) if epoch_cpu else None,
        "map50_95": round(float(metrics.get("metrics/mAP50-95(B)", 0.0)), 5),
        "map50": round(float(metrics.get("metrics/mAP50(B)", 0.0)), 5),
        "params": int(get_num_params(model)),
        "gflops": round(float(get_flops(model, trainer.args.imgsz)), 3),
        "save_dir": str(trainer.save_dir),
    }


def validate_one(weights: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Ultralytics' validation of an existing checkpoint (a reused ``--teacher``)."""
    from mtkd.env import go_offline

    go_offline()  # offline switches first
    from ultralytics import YOLO

    keep = {k: overrides[k] for k in ("data", "imgsz", "batch", "device", "workers") if k in overrides}
    metrics = YOLO(weights).val(plots=False, verbose=False, project=overrides.get("project"),
                                name="val_teacher", exist_ok=True, **keep)
    return {"map50_95": round(float(metrics.box.map), 5), "map50": round(float(metrics.box.map50), 5)}


def spawn(spec: Dict[str, Any], log: Path) -> Dict[str, Any]:
    """Run one training in a fresh interpreter; its JSON result is the last stdout line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({spec['overrides'].get('name')}); see {log}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the benchmark ----------------------------------------------------------------------------------
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


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    by_role: Dict[str, List[Dict[str, Any]]] = {}
    for r in runs:
        by_role.setdefault(r["role"], []).append(r)
    summary: Dict[str, Any] = {"roles": {}}
    base_epoch = {k: statistics.median([r["epoch_s"] for r in v]) for k, v in by_role.items()}
    base_cpu = {k: statistics.median([r["epoch_cpu_s"] for r in v]) for k, v in by_role.items()}
    for role, rs in by_role.items():
        row = {"n": len(rs), "epochs": statistics.median([r["epochs"] for r in rs]),
               "wall_s_median": statistics.median([r["wall_s"] for r in rs]),
               "epoch_s_median": base_epoch[role], "epoch_cpu_s_median": base_cpu[role]}
        for metric in ("map50_95", "map50"):
            vals = [r[metric] for r in rs]
            row[metric] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
        if "plain" in base_epoch:
            row["epoch_time_vs_plain"] = round(base_epoch[role] / base_epoch["plain"], 3)
        if "ultralytics_kd" in base_epoch:
            row["epoch_time_vs_ultralytics_kd"] = round(base_epoch[role] / base_epoch["ultralytics_kd"], 3)
            row["epoch_cpu_vs_ultralytics_kd"] = round(base_cpu[role] / base_cpu["ultralytics_kd"], 3)
        summary["roles"][role] = row
    mtkd = [r for r in MTKD_BEST_CANDIDATES if r in summary["roles"]]
    if mtkd and "ultralytics_kd" in summary["roles"]:
        best = max(mtkd, key=lambda r: (summary["roles"][r]["map50_95"]["median"],
                                        summary["roles"][r]["map50_95"]["min"]))
        ours, theirs = summary["roles"][best], summary["roles"]["ultralytics_kd"]
        summary["target"] = {
            "mtkd_best": best,
            "beats_median": ours["map50_95"]["median"] > theirs["map50_95"]["median"],
            "beats_worst_seed": ours["map50_95"]["min"] > theirs["map50_95"]["min"],
            "epoch_time_ratio": ours.get("epoch_time_vs_ultralytics_kd"),
            "epoch_cpu_ratio": ours.get("epoch_cpu_vs_ultralytics_kd"),
            "within_1_15x": (ours.get("epoch_time_vs_ultralytics_kd") or 99) <= 1.15,
        }
        for ref in ("plain", "plain_wall"):  # the no-teacher baselines, at equal epochs and equal wall-clock
            if ref in summary["roles"]:
                base = summary["roles"][ref]["map50_95"]
                summary["target"][f"vs_{ref}"] = {
                    "beats_median": ours["map50_95"]["median"] > base["median"],
                    "worst_above_best": ours["map50_95"]["min"] > base["max"]}
    return summary


def _shown(path: Any) -> str:
    """A path as the table shows it: relative to the working directory when under it."""
    try:
        return str(Path(str(path)).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def write_md(path: Path, result: Dict[str, Any]) -> None:
    s, b = result["summary"], result["budget"]
    kd = ",".join(f"{k}={v}" for k, v in (b.get("kd") or {}).items())
    lines = [
        "# YOLO distillation benchmark",
        "",
        f"Data: `{_shown(result['data']['yaml'])}` ({result['data']['nc']} classes). Student `{b['student']}`, teacher "
        + (f"`{b['teacher_model']}` ({b['teacher_epochs']} epochs" if b.get("teacher_epochs")
           else f"`{_shown(result['teacher'].get('path'))}` (reused checkpoint")
        + f", mAP50-95 {result['teacher'].get('map50_95')}, mAP50 {result['teacher'].get('map50')}). "
        + (f"Every student starts from `{_shown(b['student_init'])}`"
           + (f" (the student trained plainly for {b['pretrain_epochs']} epochs first, seed 0)"
              if b.get("pretrain_epochs") else "") + ". " if b.get("student_init")
           else "Students start from a random init per seed. ")
        + f"{b['epochs']} epochs, imgsz {b['imgsz']}, batch {b['batch']}, "
        f"seeds {b['seeds']}, device {b['device']} ({b['cpu_count']} CPUs). Total {b['total_s'] / 60:.1f} min. "
        f"mtkd KD: `{kd}`, `kd_feat={b.get('kd_feat')}` (output+feature role).",
        "",
        "Metrics: Ultralytics' final validation. Epoch time: median training-loop epoch (validation excluded), "
        "measured in this run; wall-clock, and process CPU time (robust to other load on a shared machine).",
        "",
        "| role | epochs | mAP50-95 min / median / max | mAP50 min / median / max | epoch s | vs plain | "
        "vs ultralytics_kd | CPU vs ultralytics_kd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for role in ROLES:
        if role not in s["roles"]:
            continue
        r = s["roles"][role]
        m, m50 = r["map50_95"], r["map50"]
        lines.append(
            f"| {role} | {r['epochs']:g} | {m['min']:.4f} / {m['median']:.4f} / {m['max']:.4f} | "
            f"{m50['min']:.4f} / {m50['median']:.4f} / {m50['max']:.4f} | {r['epoch_s_median']:.2f} | "
            f"{r.get('epoch_time_vs_plain', float('nan')):.2f}x | "
            f"{r.get('epoch_time_vs_ultralytics_kd', float('nan')):.2f}x | "
            f"{r.get('epoch_cpu_vs_ultralytics_kd', float('nan')):.2f}x |")
    if "target" in s:
        t = s["target"]
        lines += ["", f"Target (mtkd's best, `{t['mtkd_best']}`, vs Ultralytics' distill_model): beats median "
                      f"{'yes' if t['beats_median'] else 'no'}, beats worst seed "
                      f"{'yes' if t['beats_worst_seed'] else 'no'}, "
                      f"epoch time {t['epoch_time_ratio']}x wall, {t['epoch_cpu_ratio']}x CPU "
                      f"({'within' if t['within_1_15x'] else 'over'} 1.15x on wall-clock)."]
        for ref in ("plain", "plain_wall"):
            if f"vs_{ref}" in t:
                v = t[f"vs_{ref}"]
                lines += ["", f"`{t['mtkd_best']}` vs `{ref}` (mAP50-95): median above "
                              f"{'yes' if v['beats_median'] else 'no'}, worst seed above its best seed "
                              f"{'yes' if v['worst_above_best'] else 'no'}."]
    lines += ["", "`plain_wall`: plain fine-tune given the wall-clock of that seed's `mtkd_out_feat` training loop "
                  "(Ultralytics `time=`), i.e. the epochs KD's extra cost would buy.", ""]
    path.write_text("\n".join(lines))


def load_previous(path: Path, budget: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The runs of an earlier sitting in ``path`` (kept and skipped), or [] when
    there is none; a sitting with another budget stops instead of mixing runs."""
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{path}: not valid JSON ({exc}); move it away to start afresh") from None
    old_budget = {k: v for k, v in old.get("budget", {}).items() if k not in ("seeds", "total_s")}
    if old_budget != budget:
        diff = sorted(k for k in set(old_budget) | set(budget) if old_budget.get(k) != budget.get(k))
        raise SystemExit(f"{path}: stored runs have another budget ({', '.join(diff)} differ); "
                         "use another --out or move the file away")
    return list(old.get("runs", []))


def main(argv: List[str] | None = None) -> int:
    args = parse(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return 0
    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    roles = [r for r in args.roles.split(",") if r]
    bad = sorted(set(roles) - set(ROLES))
    if bad:
        raise SystemExit(f"--roles: unknown {bad}; known {ROLES}")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    kd_args = dict(kv.split("=", 1) for kv in args.kd.split(",") if kv)
    train_args = parse_kv(args.train_args, "--train-args")

    if args.data:
        data = Path(args.data).resolve()
    else:
        from mtkd.env import go_offline

        go_offline()  # offline switches first
        from mtkd.datasets import make_synthetic

        data = out / "data" / "yolo" / "data.yaml"
        if not data.exists():
            data = make_synthetic(out / "data", n_train=args.n_train, n_val=args.n_val, seed=0,
                                  formats=("yolo",))["yolo"]
    import yaml

    nc = len(yaml.safe_load(data.read_text())["names"])
    common = dict(data=str(data), imgsz=args.imgsz, batch=args.batch, device=args.device, workers=args.workers,
                  amp=False, plots=False, val=args.val, project=str(out / "runs"), exist_ok=True, verbose=False,
                  **train_args)

    teacher_info: Dict[str, Any] = {}
    if args.teacher:
        teacher = Path(args.teacher).resolve()
        if not teacher.is_file():
            raise SystemExit(f"--teacher: {teacher} does not exist")
        teacher_info = {"path": str(teacher), "reused": True,
                        **spawn({"validate": str(teacher), "overrides": common}, logs / "teacher_val.log")}
    else:
        teacher = out / "runs" / "teacher" / "weights" / "last.pt"
        if teacher.exists():
            teacher_info = json.loads((out / "teacher.json").read_text()) if (out / "teacher.json").exists() else {}
            teacher_info["reused"] = True
        else:
            spec = {"overrides": {**common, "model": args.teacher_model, "epochs": args.teacher_epochs, "seed": 0,
                                  "name": "teacher"}}
            teacher_info = spawn(spec, logs / "teacher.log")
            teacher = Path(teacher_info["save_dir"]) / "weights" / "last.pt"
            (out / "teacher.json").write_text(json.dumps(teacher_info))
        teacher_info["path"] = str(teacher)

    student_init: Path | None = Path(args.student_init).resolve() if args.student_init else None
    if student_init is not None and not student_init.is_file():
        raise SystemExit(f"--student-init: {student_init} does not exist")
    if student_init is None and args.pretrain_epochs > 0:
        student_init = out / "runs" / "student_pretrain" / "weights" / "last.pt"
        if not student_init.exists():
            init0 = save_init(args.student, data, 0, out / "init_s0.pt")
            spec = {"overrides": {**common, "model": str(init0), "epochs": args.pretrain_epochs, "seed": 0,
                                  "name": "student_pretrain"}}
            info = spawn(spec, logs / "student_pretrain.log")
            (out / "student_pretrain.json").write_text(json.dumps(info))
            print(f"student pre-trained {args.pretrain_epochs} epochs: mAP50-95 {info['map50_95']:.4f} "
                  f"mAP50 {info['map50']:.4f}", flush=True)

    budget = {"epochs": args.epochs, "teacher_epochs": None if args.teacher else args.teacher_epochs,
              "student_init": str(student_init) if student_init else None,
              "pretrain_epochs": args.pretrain_epochs if not args.student_init else 0,
              "imgsz": args.imgsz, "batch": args.batch, "device": args.device, "student": args.student,
              "teacher_model": args.teacher_model, "kd": kd_args, "kd_feat": args.kd_feat,
              "val_every_epoch": args.val, "cpu_count": os.cpu_count(), "train_args": train_args}
    runs = load_previous(out / "results.json", budget)

    def save() -> None:
        done_seeds = sorted({r["seed"] for r in runs})
        result = {
            "benchmark": "yolo_kd",
            "data": {"yaml": str(data), "nc": nc},
            "budget": {**budget, "seeds": done_seeds,
                       "total_s": round(time.perf_counter() - t_start, 1)},
            "teacher": teacher_info,
            "runs": runs,
            "summary": summarise(runs),
        }
        (out / "results.json").write_text(json.dumps(result, indent=2))
        write_md(out / "results.md", result)

    for seed in seeds:
        init = student_init or save_init(args.student, data, seed, out / f"init_s{seed}.pt")
        base = {**common, "model": str(init), "epochs": args.epochs, "seed": seed}
        loop_ref: float | None = None
        for role in roles:
            prev = next((r for r in runs if r["role"] == role and r["seed"] == seed), None)
            if prev is not None:  # finished in an earlier sitting with the same budget
                if role == "mtkd_out_feat":
                    loop_ref = prev.get("loop_s")
                print(f"seed {seed} {role}: kept from {out / 'results.json'}", flush=True)
                continue
            o = {**base, "name": f"{role}_s{seed}"}
            if role == "ultralytics_kd":
                o["distill_model"] = str(teacher)
            elif role in ("mtkd_out", "mtkd_out_feat"):
                o.update(kd_args, kd_teacher=str(teacher), kd_feat=args.kd_feat if role == "mtkd_out_feat" else 0.0)
            elif role == "plain_wall":
                if loop_ref is None:
                    print(f"seed {seed}: plain_wall skipped (needs mtkd_out_feat first)", flush=True)
                    continue
                o["time"] = loop_ref / 3600.0
            r = spawn({"overrides": o}, logs / f"{role}_s{seed}.log")
            if role == "mtkd_out_feat":
                loop_ref = r["loop_s"]
            runs.append({"role": role, "seed": seed, **r})
            save()
            print(f"seed {seed} {role:15s} mAP50-95 {r['map50_95']:.4f} mAP50 {r['map50']:.4f} "
                  f"epochs {r['epochs']} epoch_s {r['epoch_s']} wall {r['wall_s']}s", flush=True)

    save()
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

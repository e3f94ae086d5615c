"""``mtkd demo``: teacher, plain student and distilled student on the small testbed.

1. writes the small synthetic testbed (``make_synthetic(**TESTBEDS["small"])``,
   VOC layout) unless it exists;
2. trains the teacher (``mtkd/configs/small/teacher.yaml``, 5 epochs) and the plain student
   (``mtkd/configs/small/student.yaml``) at the same time, in two processes of one
   torch thread each, printing their progress; a teacher that finished on an
   earlier run (its ``test_metrics.json`` exists) is reused;
3. trains the distilled student (``mtkd/configs/small/kd.yaml``) with the same
   data, schedule and seed as the plain one, on every core;
4. prints and writes (``<out>/results.md``, ``<out>/results.json``) one table
   with mAP50-95, mAP50, mIoU, params, GFLOPs, steps and training time, all on
   the TEST split with the checkpoint chosen on VAL, then per metric the
   distilled student minus the plain one and the fraction of the
   teacher-student gap it closes.

It shows one seed; ``benchmarks/kd_gain`` measures the same comparison over
five seeds. The demo is self-contained and offline by design: it calls
:func:`mtkd.env.go_offline` itself, as ``mtkd --offline`` would, and its
child processes inherit the switches.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

from mtkd.cli import command

COLUMNS = ("role", "map50_95", "map50", "miou", "params", "gflops", "steps", "train_wall_s")
GAP_METRICS = ("map50_95", "map50", "miou")


def results_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table of the demo rows."""
    def cell(v: Any) -> str:
        if isinstance(v, bool) or v is None:
            return "" if v is None else str(v)
        if isinstance(v, int):
            return f"{v:,}"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


def gain_lines(teacher: Dict[str, Any], plain: Dict[str, Any], kd: Dict[str, Any]) -> List[str]:
    """Per metric: distilled minus plain, and the fraction of the teacher-plain gap closed."""
    lines = []
    for m in GAP_METRICS:
        t, p, k = (float(r[m]) for r in (teacher, plain, kd))
        gap = t - p
        closed = f"{(k - p) / gap:+.0%} of the gap" if gap > 0 else "no teacher lead to close"
        lines.append(f"{m}: distilled - plain = {k - p:+.4f} ({closed}; teacher {t:.4f}, plain {p:.4f})")
    return lines


def _progress(out: Path) -> str:
    """``epoch k/N`` and the last val fitness of a run folder, from its results.csv."""
    import csv

    path = out / "results.csv"
    if not path.is_file():
        return "starting"
    try:
        rows = list(csv.DictReader(path.read_text().splitlines()))
    except (OSError, csv.Error):
        return "running"
    if not rows:
        return "starting"
    last = rows[-1]
    fit = [r for r in rows if r.get("val/map50") and r.get("val/miou")]
    score = ""
    if fit:
        score = f", val mAP50 {float(fit[-1]['val/map50']):.3f} mIoU {float(fit[-1]['val/miou']):.3f}"
    return f"epoch {last['epoch']} step {last['step']}{score}"


def _launch(config: Path, overrides: Sequence[str], out: Path, threads: int) -> subprocess.Popen:
    """``mtkd train`` in a child process with ``threads`` torch threads; output to ``<out>.log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.parent / f"{out.name}.log", "w")
    cmd = [sys.executable, "-c", "import sys; from mtkd.cli import main; sys.exit(main(sys.argv[1:]))",
           "train", str(config), *overrides, f"out={out}"]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(procs: Dict[str, tuple], every: float) -> None:
    """Wait for the child runs, printing one progress line every ``every`` seconds."""
    t0 = time.perf_counter()
    last = 0.0
    while True:
        done = {name: p.poll() for name, (p, _) in procs.items()}
        now = time.perf_counter() - t0
        if all(rc is not None for rc in done.values()) or now - last >= every:
            last = now
            parts = [f"{name}: {'done' if done[name] == 0 else _progress(out)}" for name, (_, out) in procs.items()]
            print(f"[demo] {now:5.0f} s  " + "  |  ".join(parts), flush=True)
        failed = [name for name, rc in done.items() if rc not in (None, 0)]
        if failed:
            for p, _ in procs.values():
                if p.poll() is None:
                    p.terminate()
            name = failed[0]
            log = procs[name][1].parent / f"{procs[name][1].name}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            raise SystemExit(f"[demo] the {name} run failed ({log}): {tail[0] if tail else 'no output'}")
        if all(rc is not None for rc in done.values()):
            return
        time.sleep(1.0)


def run_demo(args: argparse.Namespace) -> int:
    from mtkd.env import go_offline

    go_offline()  # self-contained: nothing it runs may reach the network (before albumentations loads)

    from mtkd.datasets.synthetic import TESTBEDS, make_synthetic
    from mtkd.engine.config import packaged_configs

    config_dir = packaged_configs() / "small"

    start = time.perf_counter()
    out, data = Path(args.out), Path(args.data)
    sizes = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    common = [f"data.root={data / 'voc'}", f"seed={args.seed}", f"train.workers={args.workers}"]
    students = list(common) + ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    if not (data / "voc").exists():
        print(f"[demo] writing the small synthetic testbed to {data} ...", flush=True)
        spec = dict(TESTBEDS["small"], **{k: v for k, v in sizes.items() if v is not None})
        make_synthetic(data, formats=("voc",), **spec)
        print(f"[demo] data written in {time.perf_counter() - start:.0f} s", flush=True)

    teacher_dir, plain_dir, kd_dir = out / "teacher", out / "student", out / "kd"
    procs: Dict[str, tuple] = {}
    if (teacher_dir / "test_metrics.json").exists():
        print(f"[demo] reusing the teacher {teacher_dir / 'best.pt'}", flush=True)
    else:
        print("[demo] training the teacher and the plain student side by side (one thread each) ...",
              flush=True)
        t_over = list(common) + [f"train.epochs={args.teacher_epochs}"]
        procs["teacher"] = (_launch(config_dir / "teacher.yaml", t_over, teacher_dir, 1), teacher_dir)
    procs["plain student"] = (_launch(config_dir / "student.yaml", students, plain_dir, 1), plain_dir)
    _wait(procs, args.progress_every)

    print("[demo] training the distilled student (same data, schedule and seed as the plain one) ...", flush=True)
    kd = {"kd": (_launch(config_dir / "kd.yaml", students + [f"teacher.ckpt={teacher_dir / 'best.pt'}"], kd_dir,
                         args.kd_threads), kd_dir)}
    _wait(kd, args.progress_every)

    reports = {name: json.loads((d / "test_metrics.json").read_text())
               for name, d in (("teacher", teacher_dir), ("plain student", plain_dir), ("distilled student", kd_dir))}
    rows = [{"role": name, **rep} for name, rep in reports.items()]
    table = results_table(rows)
    gains = gain_lines(reports["teacher"], reports["plain student"], reports["distilled student"])
    total = time.perf_counter() - start
    note = (f"One seed ({args.seed}); benchmarks/kd_gain compares plain and distilled students over 5 seeds. "
            f"Demo time {total / 60:.1f} min.")
    (out / "results.md").write_text("Demo results on the small testbed's test split (checkpoints chosen on val).\n\n"
                                    + table + "\n\n" + "\n".join(f"- {g}" for g in gains) + f"\n\n{note}\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "gains": gains, "demo_wall_s": total,
                                                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")},
                                                 indent=2, default=str))
    print("\n" + table + "\n")
    print("\n".join(gains))
    print(f"\n{note}\n[demo] written {out / 'results.md'}")
    return 0


@command("demo", help="small testbed -> teacher and plain student side by side, distilled student -> table "
                      "(self-contained and offline by design: it always sets the --offline switches)")
def _demo_args(p: argparse.ArgumentParser):
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--data", default="data/small", help="testbed folder, written when missing (default data/small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the students (default 0)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of both students (default: the config's 6)")
    p.add_argument("--teacher-epochs", type=int, default=5,
                   help="teacher epochs (default 5, so that the demo ends within 10 minutes on 2 cores; "
                        "benchmarks/kd_gain's teacher trains the config's 8)")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: the testbed's)")
    p.add_argument("--n-val", type=int, default=None, help="validation images (default: the testbed's)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the testbed's)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per run (default 0)")
    p.add_argument("--kd-threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                   help="torch threads of the distilled run, which runs alone (default: up to 2)")
    p.add_argument("--progress-every", type=float, default=20.0, help="seconds between progress lines")
    return run_demo


#!/usr/bin/env python
"""Benchmark: training step time of teacher vs student, and data-loader throughput
vs step consumption, as ratios measured in one run.

One process builds two plain trainers from the same seed and data: the
teacher (``--teacher-config``) and the student (``--student-config``). Per
repeat (``--repeats``):

1. **Loader**: a fresh pass of the student trainer's training loader (its
   configured ``train.workers``, augmentation and collate) over
   ``--batches`` batches, with no training in between; ``loader_ms`` is the
   median time per batch after the first, ``first_batch_ms`` the first's
   (worker start-up included).
2. **Steps**: the first ``--batches`` batches (taken once, outside the
   timing) fed to both trainers' full ``train_step`` (forward, loss,
   backward, optimizer, EMA), interleaved batch by batch with the order
   rotating (:func:`benchmarks.common.interleaved_times`); medians per repeat.

Ratios per repeat:

* ``teacher_vs_student = teacher_ms / student_ms`` (step cost);
* ``loader_vs_student = student_ms / loader_ms``: how many student steps'
  worth of batches the loader produces in one step's time; ``>= 1`` means
  the loader keeps up with the student, ``< 1`` that training is input-bound
  (when both share the cores, as they do on a small CPU machine, the real
  margin is smaller);
* ``loader_vs_teacher = teacher_ms / loader_ms``, likewise for the teacher.

``results.json`` holds one record per repeat (``role: "repeat"``, ``seed``
= repeat index); ``results.md`` shows min / median / max over repeats.

Full run (lead)::

    python benchmarks/step_time/run.py --data data/synthetic --out benchmarks/step_time

Tiny check::

    python benchmarks/step_time/run.py --data /tmp/d --out /tmp/st --batches 2 --repeats 2 \\
        --set data.imgsz=64 --set train.batch=4 --set model.preset=student
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (TESTBEDS, Results, add_common_args, build_trainer, data_overrides,  # noqa: E402
                               ensure_testbed_data, extra_overrides,
                               interleaved_times, testbed_paths, take_batches)

COLUMNS = ("teacher_vs_student", "loader_vs_student", "loader_vs_teacher", "teacher_ms", "student_ms",
           "loader_ms", "first_batch_ms")


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=None, default_data=None, seeds=(0,))
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small",
                   help="whose configs and data are timed (default small)")
    p.add_argument("--teacher-config", default=None, help="default: the testbed's")
    p.add_argument("--student-config", default=None, help="default: the testbed's")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the teacher trainer only (repeatable)")
    p.add_argument("--batches", type=int, default=8, help="batches per repeat (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed step passes first (default 1)")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    args.out = args.out or str(ROOT / "benchmarks/step_time" / ("" if args.testbed == "small" else "legacy_128px"))
    args.data = args.data or tb["data"]
    args.teacher_config = args.teacher_config or tb["teacher"]
    args.student_config = args.student_config or tb["student"]
    return args


def loader_pass(loader: Any, n: int) -> List[float]:
    """Seconds per batch of a fresh pass over the first ``n`` batches of ``loader``."""
    times: List[float] = []
    it = iter(loader)
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t0)
    del it
    return times


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    from mtkd.env import go_offline

    go_offline()  # offline switches first
    import torch

    seed = args.seeds[0]
    if args.data == TESTBEDS[args.testbed]["data"]:
        ensure_testbed_data(args.testbed, args.data)
    common = data_overrides(args.data, args.format) + extra_overrides(args)
    student = build_trainer(args.student_config, common, seed)
    teacher = build_trainer(args.teacher_config, common + list(args.teacher_set), seed)
    if teacher.teacher is not None or student.teacher is not None:
        raise SystemExit("[step_time] both configs must train without a teacher (plain step cost)")
    batches = take_batches(student.train_loader, args.batches)
    if len(batches) < 2:
        raise SystemExit("[step_time] need at least 2 training batches; lower train.batch or --batches")
    budget = {"batches": len(batches), "repeats": args.repeats, "warmup": args.warmup,
              "batch": student.tcfg["batch"], "imgsz": student.cfg["data"]["imgsz"],
              "workers": student.tcfg["workers"], "threads": torch.get_num_threads(),
              "overrides": extra_overrides(args), "teacher_overrides": list(args.teacher_set)}
    res = Results(args.out, "step_time", data=args.data, budget=budget, metrics=COLUMNS, cost=(),
                  teacher_config=args.teacher_config, student_config=args.student_config)
    res.payload["runs"] = []
    fns = {"teacher": teacher.train_step, "student": student.train_step}
    for r in range(args.repeats):
        load = loader_pass(student.train_loader, len(batches))
        steps = interleaved_times(fns, batches, 1, args.warmup if r == 0 else 0)
        t_ms = 1e3 * statistics.median(steps["teacher"][0])
        s_ms = 1e3 * statistics.median(steps["student"][0])
        l_ms = 1e3 * statistics.median(load[1:])
        res.add({"role": "repeat", "seed": r, "teacher_vs_student": t_ms / s_ms,
                 "loader_vs_student": s_ms / l_ms, "loader_vs_teacher": t_ms / l_ms,
                 "teacher_ms": t_ms, "student_ms": s_ms, "loader_ms": l_ms, "first_batch_ms": 1e3 * load[0]},
                write=False)
    med = {k: statistics.median(x[k] for x in res.runs) for k in COLUMNS}
    lines = [f"teacher step / student step: median {med['teacher_vs_student']:.2f}x "
             f"({med['teacher_ms']:.0f} ms vs {med['student_ms']:.0f} ms per batch of {budget['batch']})",
             f"loader throughput / student step consumption: median {med['loader_vs_student']:.2f} "
             f"({'keeps up' if med['loader_vs_student'] >= 1 else 'INPUT-BOUND'}; "
             f"{med['loader_ms']:.0f} ms per batch with {budget['workers']} workers)",
             f"loader throughput / teacher step consumption: median {med['loader_vs_teacher']:.2f}"]
    res.write(derived=lines)
    print("\n".join(lines))
    print(f"[step_time] wrote {res.json_path} and {res.md_path}")
    return res.payload


if __name__ == "__main__":
    main()

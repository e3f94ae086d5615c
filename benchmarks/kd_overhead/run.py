#!/usr/bin/env python
"""Benchmark: the cost of distillation per training step, against its physical limit.

Two trainers are built in one process from the same seed: the plain student
(``--plain-config``) and the distilled student (``--kd-config``, teacher from
``--teacher-ckpt``). The same ``--batches`` training batches (taken once
from the loader, so data loading is excluded) are fed to both full training
steps (forward, losses, backward, optimizer, EMA and auxiliary steps such as
the GAN discriminator's), interleaved batch by batch with the order rotating
(:func:`benchmarks.common.interleaved_times`), ``--repeats`` times, after
``--warmup`` untimed passes. The teacher's forward alone (as the trainer
runs it, under ``no_grad``) is timed in the same rotation.

Per repeat, with medians over the batches of that repeat:

* ``overhead = kd_step / plain_step``;
* ``limit = 1 + teacher_fwd / plain_step``: what distillation must cost at
  least if its losses were free (the teacher's forward has to run);
* ``excess = overhead - limit``: what the losses, adapters and auxiliary
  steps add on top.

``results.json`` holds one record per repeat (``role: "repeat"``, ``seed`` =
repeat index) with these numbers and the step times in ms; ``results.md``
shows min / median / max over repeats. The teacher's weights do not change
its cost, so without a checkpoint (``--teacher-ckpt`` missing) a randomly
initialised teacher of ``--teacher-preset`` is saved to
``<out>/random_teacher.pt`` and used.

Full run (lead)::

    python benchmarks/kd_overhead/run.py --data data/synthetic \\
        --teacher-ckpt runs/demo/teacher/best.pt --out benchmarks/kd_overhead

Tiny check::

    python benchmarks/kd_overhead/run.py --data /tmp/d --out /tmp/kdo --batches 2 --repeats 2 \\
        --set data.imgsz=64 --set train.batch=4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (TESTBEDS, Results, add_common_args, build_trainer, data_overrides,  # noqa: E402
                               ensure_testbed_data, extra_overrides,
                               interleaved_times, testbed_paths, random_checkpoint, take_batches)

COLUMNS = ("overhead", "limit", "excess", "plain_ms", "kd_ms", "teacher_fwd_ms")


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=None, default_data=None, seeds=(0,))
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small",
                   help="whose configs, data and teacher are timed (default small)")
    p.add_argument("--plain-config", default=None, help="default: the testbed's plain student")
    p.add_argument("--kd-config", default=None, help="default: the testbed's distilled student")
    p.add_argument("--teacher-ckpt", default=None,
                   help="teacher checkpoint (default the testbed's; a random one of --teacher-preset when missing)")
    p.add_argument("--teacher-preset", default=None,
                   help="model preset of the random teacher (default teacher_small / teacher)")
    p.add_argument("--batches", type=int, default=8, help="training batches per repeat (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="repeats (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    small = args.testbed == "small"
    args.out = args.out or str(ROOT / "benchmarks/kd_overhead" / ("" if small else "legacy_128px"))
    args.data = args.data or tb["data"]
    args.plain_config = args.plain_config or tb["student"]
    args.kd_config = args.kd_config or tb["kd"]
    args.teacher_ckpt = args.teacher_ckpt or tb["teacher_ckpt"]
    args.teacher_preset = args.teacher_preset or ("teacher_small" if small else "teacher")
    return args


def teacher_ckpt(args: argparse.Namespace, classes: List[str]) -> Path:
    ckpt = Path(args.teacher_ckpt)
    if ckpt.is_file():
        return ckpt
    path = Path(args.out) / "random_teacher.pt"
    print(f"[kd_overhead] {ckpt} not found: timing a random-init '{args.teacher_preset}' teacher ({path})")
    return random_checkpoint(path, {"preset": args.teacher_preset}, classes)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    from mtkd.env import go_offline

    go_offline()  # offline switches first
    import torch

    seed = args.seeds[0]
    if args.data == TESTBEDS[args.testbed]["data"]:
        ensure_testbed_data(args.testbed, args.data)
    common = data_overrides(args.data, args.format) + ["train.workers=0"] + extra_overrides(args)
    plain = build_trainer(args.plain_config, common, seed)
    ckpt = teacher_ckpt(args, plain.classes)
    kd = build_trainer(args.kd_config, common + [f"teacher.ckpt={json.dumps(str(ckpt))}"], seed)
    if kd.teacher is None:
        raise SystemExit(f"[kd_overhead] {args.kd_config} builds no teacher; nothing to compare")
    batches = take_batches(plain.train_loader, args.batches)

    def teacher_fwd(batch: Dict[str, Any]) -> Any:
        images = batch["images"].to(kd.device)
        with torch.no_grad():
            return kd.teacher(images)

    fns = {"plain": plain.train_step, "kd": kd.train_step, "teacher_fwd": teacher_fwd}
    times = interleaved_times(fns, batches, args.repeats, args.warmup)
    budget = {"batches": len(batches), "repeats": args.repeats, "warmup": args.warmup,
              "batch": plain.tcfg["batch"], "imgsz": plain.cfg["data"]["imgsz"],
              "threads": torch.get_num_threads(), "overrides": extra_overrides(args)}
    res = Results(args.out, "kd_overhead", data=args.data, budget=budget, metrics=COLUMNS, cost=(),
                  teacher=str(ckpt), kd_config=args.kd_config, plain_config=args.plain_config,
                  kd_losses=sorted(name for name, _ in kd.composer.modules_flat()))
    res.payload["runs"] = []
    for r in range(args.repeats):
        med = {n: statistics.median(times[n][r]) for n in fns}
        overhead = med["kd"] / med["plain"]
        limit = 1.0 + med["teacher_fwd"] / med["plain"]
        res.add({"role": "repeat", "seed": r, "overhead": overhead, "limit": limit, "excess": overhead - limit,
                 "plain_ms": 1e3 * med["plain"], "kd_ms": 1e3 * med["kd"],
                 "teacher_fwd_ms": 1e3 * med["teacher_fwd"],
                 "raw_s": {n: times[n][r] for n in fns}}, write=False)
    o = statistics.median(x["overhead"] for x in res.runs)
    lim = statistics.median(x["limit"] for x in res.runs)
    lines = [f"distillation step / plain step: median {o:.2f}x over {args.repeats} repeats "
             f"(min {min(x['overhead'] for x in res.runs):.2f}, max {max(x['overhead'] for x in res.runs):.2f})",
             f"physical limit 1 + teacher_fwd / plain_step: median {lim:.2f}x; the losses and auxiliary "
             f"steps add {o - lim:+.2f}x on top"]
    res.write(derived=lines)
    print("\n".join(lines))
    print(f"[kd_overhead] wrote {res.json_path} and {res.md_path}")
    return res.payload


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Benchmark: are the testbed's teacher and plain student trained to their plateau?

For the teacher (``--teacher-config``) and the plain student
(``--student-config``), over ``--seeds`` (default 0 1 2): one run at the
config's epochs (``E``, role ``teacher`` / ``plain``) and one at twice as
many (``2E``, role ``teacher@2x`` / ``plain@2x``), each with its own full
schedule (warm-up, cosine decay to the end). The verdict per model: the
median VAL fitness (mean of mAP50 and mIoU of the best epoch, the quantity
``best.pt`` is chosen on) rises by less than ``--tolerance`` (0.01) from
``E`` to ``2E``; test metrics are reported beside it. Runs go two at a time
(one torch thread each) on a machine with 2+ cores, seed-major so that the
roles interleave.

    python benchmarks/plateau/run.py                      # small testbed, writes benchmarks/plateau/
    python benchmarks/plateau/run.py --data /tmp/d --out /tmp/pl --seeds 0 --set train.epochs=1   # tiny
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (TESTBEDS, Results, add_common_args, default_jobs, prepare,  # noqa: E402
                               recorder, reusable_e_runs, run_jobs, testbed_paths)

TOLERANCE = 0.01


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=str(ROOT / "benchmarks/plateau"), default_data=None, seeds=(0, 1, 2))
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small")
    p.add_argument("--teacher-config", default=None)
    p.add_argument("--student-config", default=None)
    p.add_argument("--models", nargs="+", choices=("teacher", "plain"), default=["teacher", "plain"])
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help=f"largest median val-fitness rise from E to 2E that counts as a plateau ({TOLERANCE})")
    p.add_argument("--jobs", type=int, default=default_jobs(), help="runs at a time, one thread each")
    p.add_argument("--reuse", default=None, metavar="RESULTS_JSON",
                   help="take the E runs (roles teacher/plain) of these seeds from another benchmark's "
                        "results.json (e.g. benchmarks/kd_gain/results.json) where they were trained with "
                        "the same config, epochs and overrides (or an earlier plateau sitting's @2x runs at E "
                        "epochs), instead of training them again")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    args.data = args.data or tb["data"]
    args.teacher_config = args.teacher_config or tb["teacher"]
    args.student_config = args.student_config or tb["student"]
    return args


def val_fitness(rec: Dict[str, Any]) -> Optional[float]:
    """Mean of the best epoch's val mAP50 and val mIoU (the multi-task fitness)."""
    if rec.get("val_map50") is None or rec.get("val_miou") is None:
        return None
    return (float(rec["val_map50"]) + float(rec["val_miou"])) / 2


def verdicts(runs: List[Dict[str, Any]], tolerance: float) -> Tuple[List[str], Dict[str, Any]]:
    lines, summary = [], {}
    for base in ("teacher", "plain"):
        fits = {}
        for role in (base, f"{base}@2x"):
            vals = [v for v in (val_fitness(r) for r in runs if r["role"] == role) if v is not None]
            fits[role] = statistics.median(vals) if vals else None
        a, b = fits[base], fits[f"{base}@2x"]
        if a is None or b is None:
            continue
        rise = b - a
        ok = rise < tolerance
        steps = {role: statistics.median([r["steps"] for r in runs if r["role"] == role])
                 for role in (base, f"{base}@2x")}
        summary[base] = {"val_fitness": a, "val_fitness_2x": b, "rise": rise, "plateau": ok, "steps": steps}
        lines.append(f"{base}: median val fitness {a:.4f} at {steps[base]:.0f} steps, {b:.4f} at "
                     f"{steps[base + '@2x']:.0f} steps: rise {rise:+.4f} "
                     f"({'PLATEAU' if ok else 'NOT at plateau'}: limit {tolerance})")
    return lines, summary


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    data_ov, extra = prepare(args)
    from mtkd.engine.config import load_config

    configs = {"teacher": args.teacher_config, "plain": args.student_config}
    epochs = {m: int(load_config(configs[m], data_ov + extra)["train"]["epochs"]) for m in args.models}
    old = Path(args.out) / "results.json"
    sat = json.loads(old.read_text()).get("budget", {}).get("epochs", {}) if old.is_file() else {}
    res = Results(args.out, "plateau", data=args.data,
                  budget={"testbed": args.testbed, "epochs": {**sat, **epochs}, "seeds": args.seeds, "overrides": extra,
                          "tolerance": args.tolerance})

    def refresh() -> None:
        lines, summary = verdicts(res.runs, args.tolerance)
        res.write(derived=lines, summary=summary)

    record = recorder(res, "plateau", refresh, lambda rec: {"val_fitness": val_fitness(rec)})
    for rec in reusable_e_runs(args.reuse, args.data, epochs, extra, args.seeds):
        mine = [r for r in res.runs if r["role"] == rec["role"] and r["seed"] == rec["seed"]]
        if not mine:
            res.add(dict(rec, val_fitness=val_fitness(rec), reused_from=args.reuse))
        elif mine[0].get("reused_from") and mine[0].get("val_fitness") is None:
            mine[0].update(rec, val_fitness=val_fitness(rec))

    jobs = []
    for seed in args.seeds:
        for model in args.models:
            for role, ep in ((model, epochs[model]), (f"{model}@2x", 2 * epochs[model])):
                if res.has(role, seed):
                    continue
                out = res.run_dir(role, seed)
                jobs.append(((role, seed, out), {"config": configs[model], "overrides": data_ov + extra,
                                                 "seed": seed, "out": str(out), "epochs": ep}))
    # the longest runs first, so that the two workers finish together
    jobs.sort(key=lambda j: -j[1]["epochs"] * (3 if j[0][0].startswith("teacher") else 1))
    run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc="plateau")
    lines, summary = verdicts(res.runs, args.tolerance)
    return res.finish(lines, summary=summary)


if __name__ == "__main__":
    main()

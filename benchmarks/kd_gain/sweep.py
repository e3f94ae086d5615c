#!/usr/bin/env python
"""Choose the KD settings on the VAL split: each setting of ``--settings`` on its own seeds.

Every setting is the KD config (``--kd-config``) plus a list of overrides
(``benchmarks/kd_gain/sweep.yaml``: ``name`` and ``set``), trained on
``--seeds`` (default 100 101: never the seeds that judge, 0-4), beside the
plain student on the same seeds. The score of a run is its best epoch's
``(val mAP50-95 + val mIoU) / 2``, the two metrics the targets name; the
settings are ranked by their median score, and the winner's overrides are
printed to copy into the KD config. Test metrics are recorded too but are
not looked at for the choice.

    python benchmarks/kd_gain/sweep.py                 # small testbed -> benchmarks/kd_gain/sweep/
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import (TESTBEDS, Results, add_common_args, default_jobs, prepare,  # noqa: E402
                               recorder, run_jobs, testbed_paths)


def parse(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_out=str(ROOT / "benchmarks/kd_gain/sweep"), default_data=None, seeds=(100, 101))
    p.add_argument("--testbed", choices=sorted(TESTBEDS), default="small")
    p.add_argument("--settings", default=str(ROOT / "benchmarks/kd_gain/sweep.yaml"),
                   help="YAML list of {name, set: [key=value, ...]} applied to the KD config")
    p.add_argument("--only", nargs="+", default=None, help="run only these setting names")
    p.add_argument("--teacher-ckpt", default=None, help="default: the testbed's")
    p.add_argument("--jobs", type=int, default=default_jobs(), help="runs at a time, one thread each")
    args = p.parse_args(argv)
    tb = testbed_paths(args.testbed, ROOT)
    args.data = args.data or tb["data"]
    args.teacher_ckpt = args.teacher_ckpt or tb["teacher_ckpt"]
    args.student_config, args.kd_config = tb["student"], tb["kd"]
    return args


def load_settings(path: str | Path) -> List[Dict[str, Any]]:
    """The settings file: a list of ``{name: str, set: [str, ...]}`` with distinct names."""
    from mtkd.errors import ConfigError

    items = yaml.safe_load(Path(path).read_text())
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a list of settings")
    seen = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or \
                not isinstance(item.get("set", []), list):
            raise ConfigError(f"{path}: item {i}: expected {{name: str, set: [key=value, ...]}}")
        if item["name"] in seen or item["name"] == "plain":
            raise ConfigError(f"{path}: item {i}: name {item['name']!r} is taken")
        seen.add(item["name"])
    return items


def score(rec: Dict[str, Any]) -> Optional[float]:
    """``(val mAP50-95 + val mIoU) / 2`` of a run's best epoch."""
    if rec.get("val_map50_95") is None or rec.get("val_miou") is None:
        return None
    return (float(rec["val_map50_95"]) + float(rec["val_miou"])) / 2


def ranking(runs: List[Dict[str, Any]]) -> Tuple[List[str], List[Dict[str, Any]]]:
    rows = []
    for role in dict.fromkeys(r["role"] for r in runs):
        vals = [v for v in (score(r) for r in runs if r["role"] == role) if v is not None]
        if vals:
            rows.append({"role": role, "median_score": statistics.median(vals), "n": len(vals)})
    rows.sort(key=lambda r: -r["median_score"])
    plain = next((r["median_score"] for r in rows if r["role"] == "plain"), None)
    lines = []
    for i, r in enumerate(rows):
        rel = "" if plain is None or r["role"] == "plain" else f" ({r['median_score'] - plain:+.4f} vs plain)"
        lines.append(f"{i + 1}. {r['role']}: median val score {r['median_score']:.4f} over {r['n']} seeds{rel}")
    return lines, rows


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse(argv)
    data_ov, extra = prepare(args)
    settings = load_settings(args.settings)
    if args.only:
        settings = [s for s in settings if s["name"] in args.only]
    old = Path(args.out) / "results.json"
    tried = json.loads(old.read_text()).get("settings", {}) if old.is_file() else {}
    res = Results(args.out, "kd_sweep", data=args.data,
                  budget={"testbed": args.testbed, "seeds": args.seeds, "overrides": extra},
                  metrics=("map50_95", "map50", "miou", "val_map50_95", "val_miou"),
                  settings={**tried, **{s["name"]: s.get("set", []) for s in settings}}, teacher=args.teacher_ckpt)
    teacher_ov = [f"teacher.ckpt={json.dumps(str(args.teacher_ckpt))}"]

    record = recorder(res, "sweep", lambda: res.write(derived=ranking(res.runs)[0]),
                      lambda rec: {"val_score": score(rec)})

    jobs = []
    for seed in args.seeds:
        plan = [("plain", args.student_config, [])] + [(s["name"], args.kd_config, teacher_ov + list(s.get("set", [])))
                                                       for s in settings]
        for role, config, ov in plan:
            if res.has(role, seed):
                continue
            out = res.run_dir(role, seed)
            jobs.append(((role, seed, out), {"config": config, "overrides": data_ov + ov + extra, "seed": seed,
                                             "out": str(out), "epochs": None}))
    run_jobs(jobs, args.jobs, 1 if args.jobs > 1 else None, record, desc="sweep")
    lines, rows = ranking(res.runs)
    res.write(derived=lines, ranking=rows)
    print("\n".join(lines))
    best = next((r["role"] for r in rows if r["role"] != "plain"), None)
    if best is not None:
        print(f"[sweep] best setting on val: {best}: {res.payload['settings'][best]}")
    print(f"[sweep] wrote {res.json_path} and {res.md_path}")
    return res.payload


if __name__ == "__main__":
    main()

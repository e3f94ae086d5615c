"""Shared helpers of the mtkd benchmarks: run configs, collect records, write results.

A benchmark is a list of training runs, each a *record*::

    {"role": "kd", "seed": 0, "epochs": 25, "steps": 500, "wall_s": 812.4,
     "map50_95": 0.41, "map50": 0.63, "miou": 0.58, "params": 3.6e6, "gflops": 0.21,
     "out": "benchmarks/kd_gain/runs/kd_s0"}

``wall_s`` is the *training* wall-clock of the run (``train_wall_s`` of
``test_metrics.json``: data loading + steps, no validation), the same clock
``train.time_budget_s`` budgets, so equal-wall-clock comparisons use one
clock. Metrics are on the TEST split with the run's ``best.pt`` (chosen on
val). A record may carry further keys (``latency_ms``, ``out``); tables show
:data:`METRICS`.

Every benchmark writes, into its ``--out`` folder:

* ``results.json``: ``{"benchmark": name, "data": path, "budget": {...},
  "runs": [record, ...], ...extra}``;
* ``results.md``: made only from that JSON, one table row per role with
  min / median / max of each metric over its seeds, the seeds listed, plus
  the benchmark's derived lines (verdicts, ratios).

Runs are resumable across sittings: :class:`Results` loads an existing
``results.json``, :meth:`Results.has` tells whether a ``(role, seed)`` is
already there, :meth:`Results.add` replaces or appends a record and rewrites
both files at once (so an interrupted sitting keeps every finished run).

Typical use (see ``benchmarks/kd_gain/run.py``)::

    p = argparse.ArgumentParser(); add_common_args(p, default_out="benchmarks/x")
    args = p.parse_args()
    data = data_overrides(args.data, args.format) + list(args.set)
    res = Results(args.out, "x", data=args.data, budget={"epochs": args.epochs})
    for role, seed in progress(plan, desc="x"):
        if not res.has(role, seed):
            rec = run_record(role, "mtkd/configs/x.yaml", seed, res.run_dir(role, seed),
                             overrides=data + [f"train.epochs={args.epochs}"])
            res.add(rec)
    res.write(derived=["..."])
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from tqdm import tqdm

METRICS = ("map50_95", "map50", "miou")
"""Quality metrics summarised per role (higher is better)."""
COST = ("params", "gflops", "epochs", "steps", "wall_s")
"""Cost columns summarised per role (median only in the table)."""
RECORD_KEYS = ("role", "seed", "epochs", "steps", "wall_s") + METRICS + ("params", "gflops")
FORMATS = ("voc", "coco", "yolo")


# -- data ---------------------------------------------------------------------------------------
def data_overrides(path: str | Path, fmt: Optional[str] = None) -> List[str]:
    """Config overrides (``data.format=...``, ``data.root=...``) pointing a run at ``path``.

    ``fmt`` (``voc``/``coco``/``yolo``) skips inference
    (:func:`mtkd.datasets.infer_format`); the path is then used
    as the root as given (a make-synthetic folder still resolves to its
    ``<fmt>/`` layout).
    """
    from mtkd.datasets import infer_format
    from mtkd.errors import ConfigError

    if fmt is None:
        fmt, root = infer_format(path, "--data", "--format")
    else:
        if fmt not in FORMATS:
            raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
        root = Path(path)
        sub = root / ("yolo/data.yaml" if fmt == "yolo" else fmt)
        if sub.exists():
            root = sub
    return [f"data.format={fmt}", f"data.root={json.dumps(str(root))}"]


def add_common_args(parser: argparse.ArgumentParser, default_out: Optional[str],
                    default_data: Optional[str] = "data/synthetic",
                    seeds: Optional[Sequence[int]] = (0, 1, 2)) -> None:
    """``--data``, ``--format``, ``--out``, ``--seeds``, ``--device``, ``--set`` (shared by every benchmark).

    A default of ``None`` leaves the value for the benchmark to fill in (e.g. from ``--testbed``).
    """
    def shown(v: Any) -> str:
        if v is None:
            return "the testbed's"
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    parser.add_argument("--data", default=default_data,
                        help="dataset: a VOC tree, a COCO tree, a YOLO data yaml or a make-synthetic folder "
                             f"(default {shown(default_data)})")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="dataset format (default: inferred from --data)")
    parser.add_argument("--out", default=default_out, help=f"output folder (default {shown(default_out)})")
    parser.add_argument("--seeds", type=int, nargs="+", default=None if seeds is None else list(seeds),
                        help=f"seeds (default {shown(seeds)})")
    parser.add_argument("--device", default=None,
                        help="train.device of every run: auto, cpu, cuda or cuda:N (default: the configs')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run, e.g. --set train.workers=0 "
                             "or --set data.ann_file=annotations/instances_{split}2017.json (repeatable)")


def extra_overrides(args: argparse.Namespace) -> List[str]:
    """The ``--set`` overrides plus ``train.device`` from ``--device`` (when given)."""
    extra = list(args.set)
    if getattr(args, "device", None):
        extra.append(f"train.device={args.device}")
    return extra


#: The two testbeds: the configs of their roles, their default data and teacher checkpoint.
#: ``small`` is the 64-px testbed whose models train in minutes; ``large`` the 128-px one of the ``legacy_128px``
#: results, whose students are far from their plateau on a CPU.
TESTBEDS: Dict[str, Dict[str, str]] = {
    "small": {"data": "data/small", "teacher": "mtkd/configs/small/teacher.yaml",
              "student": "mtkd/configs/small/student.yaml", "kd": "mtkd/configs/small/kd.yaml",
              "ablation": "mtkd/configs/small/ablation", "teacher_ckpt": "runs/small/teacher/best.pt"},
    "large": {"data": "data/synthetic", "teacher": "mtkd/configs/synthetic_teacher.yaml",
              "student": "mtkd/configs/synthetic_student.yaml", "kd": "mtkd/configs/synthetic_kd.yaml",
              "ablation": "mtkd/configs/ablation", "teacher_ckpt": "runs/demo/teacher/best.pt"},
}


def testbed_paths(name: str, root: Path) -> Dict[str, str]:
    """:data:`TESTBEDS` entry ``name`` with config paths made absolute under ``root``."""
    tb = dict(TESTBEDS[name])
    for key in ("teacher", "student", "kd", "ablation"):
        tb[key] = str(root / tb[key])
    return tb


def ensure_testbed_data(testbed: str, data: str | Path) -> None:
    """Write the testbed's synthetic set at ``data`` (VOC layout) when nothing is there.

    Only for the default synthetic data: a user's ``--data`` that does not
    exist stays an error (raised later by the dataset).
    """
    from mtkd.datasets.synthetic import TESTBEDS as SETS, make_synthetic

    if Path(data).exists():
        return
    print(f"[benchmark] writing the {testbed} testbed's synthetic set to {data} ...", flush=True)
    make_synthetic(data, formats=("voc",), **SETS[testbed])


def prepare(args: argparse.Namespace) -> Tuple[List[str], List[str]]:
    """Start of a benchmark's ``main``: the offline switches, the testbed's synthetic set
    (written when ``--data`` is the testbed's default and missing), and the overrides of
    every run: ``(data overrides, --set/--device overrides)``."""
    from mtkd.env import go_offline

    go_offline()
    testbed = getattr(args, "testbed", None)
    if testbed is not None and args.data == TESTBEDS[testbed]["data"]:
        ensure_testbed_data(testbed, args.data)
    return data_overrides(args.data, args.format), extra_overrides(args)


def progress(items: Iterable[Any], desc: str, total: Optional[int] = None) -> Iterable[Any]:
    """A tqdm bar over a benchmark's planned runs (one line, stays on screen)."""
    items = list(items)
    return tqdm(items, desc=desc, total=total if total is not None else len(items), dynamic_ncols=True)


# -- runs ---------------------------------------------------------------------------------------
def run_config(config: str | Path, overrides: Sequence[str] = (), *, seed: int, out: str | Path,
               epochs: Optional[int] = None, max_steps: Optional[int] = None,
               time_budget_s: Optional[float] = None) -> Dict[str, Any]:
    """Train ``config`` in-process with ``overrides`` plus seed/out/budget; returns the test report.

    ``epochs``, ``max_steps``, ``time_budget_s`` become ``train.*`` overrides
    when given (after ``overrides``, so they win). A previous run in ``out``
    is overwritten (benchmarks decide what to skip via :class:`Results`).
    """
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import train

    ov = list(overrides) + [f"seed={int(seed)}", f"out={json.dumps(str(out))}"]
    if epochs is not None:
        ov.append(f"train.epochs={int(epochs)}")
    if max_steps is not None:
        ov.append(f"train.max_steps={int(max_steps)}")
    if time_budget_s is not None:
        ov.append(f"train.time_budget_s={float(time_budget_s)}")
    cfg = load_config(config, ov)
    return train(cfg)


def train_job(config: str, overrides: Sequence[str], seed: int, out: str, epochs: Optional[int],
              threads: Optional[int]) -> Tuple[Dict[str, Any], float]:
    """One :func:`run_config` run in a worker process: ``(test report, seconds)``.

    Top-level (picklable by reference) so :func:`run_jobs` can hand it to a
    spawned process; ``threads`` caps that process's torch CPU threads.
    """
    import torch

    from mtkd.env import go_offline

    go_offline()  # offline switches before any library import

    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    report = run_config(config, overrides, seed=seed, out=out, epochs=epochs)
    return report, time.perf_counter() - t0


_WORKER_STOP: List[str] = []
"""In a :func:`run_jobs` worker: the signal that stopped the benchmark, once one did."""


def _worker_init() -> None:
    """A :func:`run_jobs` worker remembers SIGINT/SIGTERM between runs instead of dying of it.

    A run in progress handles both itself (the trainer saves ``last.pt`` and
    raises :class:`mtkd.errors.Interrupted`); afterwards the worker starts no
    further run, so stopping a benchmark never leaves workers pulling queued
    jobs.
    """
    import signal

    def remember(signum: int, frame: Any) -> None:
        _WORKER_STOP.append(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, remember)
    signal.signal(signal.SIGTERM, remember)


def _guarded_job(job: Any, *args: Any) -> Any:
    """``job(*args)`` in a :func:`run_jobs` worker, unless the benchmark was stopped."""
    import signal

    from mtkd.errors import Interrupted

    if _WORKER_STOP:
        name = _WORKER_STOP[0]
        raise Interrupted(f"interrupted by {name} before this run started", 128 + int(getattr(signal, name)),
                          "run the benchmark again")
    try:
        return job(*args)
    except Interrupted as exc:
        name = exc.reason.split()[2] if exc.reason.startswith("interrupted by ") else ""
        _WORKER_STOP.append(name if name in ("SIGINT", "SIGTERM") else "SIGTERM")
        raise


def run_jobs(jobs: Sequence[Tuple[Any, Mapping[str, Any]]], n_jobs: int, threads_per_job: Optional[int],
             on_done: Any, desc: str, job: Any = train_job) -> None:
    """Run independent training runs, ``n_jobs`` at a time, and report each as it finishes.

    ``jobs`` is a list of ``(key, kwargs of train_job)``; ``job`` (default
    :func:`train_job`) is called with them as ``train_job`` is, and returns
    ``(report, seconds)`` likewise: a benchmark that does more after training
    (e.g. attacks the checkpoint) passes a picklable wrapper around
    ``train_job`` (a top-level function or a ``functools.partial`` of one). ``on_done(key, report,
    seconds, error)`` is called in the parent, in completion order, with
    ``error`` an :class:`mtkd.errors.MtkdError` (bad config or data: recorded,
    the others go on) or ``None``. Any other exception stops the benchmark,
    and so does :class:`mtkd.errors.Interrupted` (SIGINT/SIGTERM: the run's
    ``last.pt`` is saved and no further run starts). With a pool, a signal to
    the parent alone is forwarded to the workers, and no worker starts a
    queued run after a signal.
    ``n_jobs == 1`` runs in this process (torch threads as set by the caller);
    more use a ``spawn`` process pool, each worker with ``threads_per_job``
    threads: independent runs on one machine, not distributed training
    (multi-GPU training is ``torchrun``'s job, see the README).
    """
    from mtkd.errors import Interrupted, MtkdError

    if not jobs:
        return
    bar = tqdm(total=len(jobs), desc=desc, dynamic_ncols=True)
    if n_jobs <= 1:
        for key, kw in jobs:
            t0 = time.perf_counter()
            try:
                report, secs = job(kw["config"], kw["overrides"], kw["seed"], kw["out"], kw.get("epochs"), None)
                on_done(key, report, secs, None)
            except Interrupted:
                bar.close()
                raise
            except MtkdError as exc:
                on_done(key, None, time.perf_counter() - t0, exc)
            bar.update()
        bar.close()
        return
    import multiprocessing as mp
    import signal
    import threading
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    stop: List[str] = []  # the signal that asked the benchmark to stop, once one did

    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = {pool.submit(_guarded_job, job, kw["config"], list(kw["overrides"]), kw["seed"], kw["out"],
                               kw.get("epochs"), threads_per_job): key for key, kw in jobs}

        def on_signal(signum: int, frame: Any) -> None:
            # No further run starts; the running ones save last.pt and end (Interrupted).
            if not stop:
                stop.append(signal.Signals(signum).name)
            for other in futures:
                other.cancel()
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                if proc.is_alive():
                    os.kill(proc.pid, signal.SIGTERM)

        previous = {}
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for fut in as_completed(futures):
                key = futures[fut]
                try:
                    report, secs = fut.result()
                    on_done(key, report, secs, None)
                except Interrupted:
                    for other in futures:
                        other.cancel()
                    bar.close()
                    raise
                except BrokenProcessPool:
                    if not stop:
                        raise
                    bar.close()
                    raise Interrupted(f"interrupted by {stop[0]}: a worker ended before its run started",
                                      128 + int(getattr(signal, stop[0])), "run the benchmark again") from None
                except MtkdError as exc:
                    on_done(key, None, 0.0, exc)
                bar.update()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    bar.close()


def recorder(res: "Results", name: str, refresh: Any, enrich: Any = None) -> Any:
    """The ``on_done`` of :func:`run_jobs` for jobs keyed ``(role, seed, out[, extra dict])``.

    A finished run becomes :func:`make_record` (plus ``total_s``, the extra
    dict, the report's own ``record`` dict (keys a job measures beyond the test
    report) and ``enrich(record)``'s keys) and is added to ``res``; then
    ``refresh()`` rewrites the verdicts. A failed run (config or data error)
    is printed as one line and not recorded.
    """
    def on_done(key: tuple, report: Optional[Dict[str, Any]], secs: float, error: Optional[Exception]) -> None:
        role, seed, out = key[:3]
        if error is not None:
            print(f"[{name}] {role} seed {seed} failed: {error}")
            return
        rec = make_record(role, seed, report, out=out, total_s=secs, **(key[3] if len(key) > 3 else {}))
        rec.update(report.get("record") or {})
        if enrich is not None:
            rec.update(enrich(rec))
        res.add(rec)
        refresh()
    return on_done


def interleaved_plan(roles: Sequence[str], seeds: Sequence[int]) -> List[Tuple[str, int]]:
    """``(role, seed)`` pairs, seed-major, the role order rotated by one from each seed to the next.

    Run in this order (``--jobs`` at a time), every role meets every position
    and every neighbour on a shared machine, so slow drifts of its load do not
    fall on one role.
    """
    roles = list(roles)
    plan: List[Tuple[str, int]] = []
    for i, seed in enumerate(seeds):
        k = i % len(roles) if roles else 0
        plan += [(role, seed) for role in roles[k:] + roles[:k]]
    return plan


def check_budget(path: str | Path, budget: Mapping[str, Any], keys: Sequence[str], name: str,
                 force: bool = False, hint: str = "use the same settings, another --out, or --force") -> None:
    """Stop (``SystemExit``, one line ending in ``hint``) when the runs stored in ``path`` used another
    value of one of ``keys``.

    A key missing on either side is not compared; ``force`` or a missing file skips the check.
    """
    path = Path(path)
    if force or not path.is_file():
        return
    try:
        prev = json.loads(path.read_text()).get("budget", {})
    except json.JSONDecodeError as exc:
        raise SystemExit(f"[{name}] {path}: not valid JSON ({exc}); move it away to start afresh") from None
    for key in keys:
        if key in prev and key in budget and prev[key] != budget[key]:
            raise SystemExit(f"[{name}] {path}: its runs used {key}={prev[key]!r}, this sitting {budget[key]!r}; "
                             + hint)


def default_jobs() -> int:
    """Parallel runs by default: 2 on a machine with 2+ CPU cores (each run 1 thread there), else 1."""
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def make_record(role: str, seed: int, report: Mapping[str, Any], out: Optional[str | Path] = None,
                **extra: Any) -> Dict[str, Any]:
    """A run record from a test report (the dict of ``test_metrics.json``).

    Missing metrics (e.g. ``miou`` of a detection-only model) are ``None``.
    """
    rec: Dict[str, Any] = {"role": role, "seed": int(seed),
                           "epochs": report.get("epochs_run"), "steps": report.get("steps"),
                           "wall_s": report.get("train_wall_s")}
    for k in METRICS + ("params", "gflops", "latency_ms"):
        v = report.get(k)
        rec[k] = float(v) if isinstance(v, (int, float)) else None
    if out is not None:
        rec["out"] = str(out)
        rec.update({f"val_{k}": v for k, v in best_val_metrics(out, report.get("best_epoch")).items()})
    rec.update(extra)
    return rec


def best_val_metrics(run_dir: str | Path, best_epoch: Any) -> Dict[str, float]:
    """The VAL metrics (:data:`METRICS`) of a run's best epoch, read from its ``results.csv``.

    Settings are chosen on these, never on the test metrics of the record.
    Empty when the file or the epoch's row is missing.
    """
    import csv

    path = Path(run_dir) / "results.csv"
    if best_epoch is None or not path.is_file():
        return {}
    for row in csv.DictReader(path.read_text().splitlines()):
        if str(row.get("epoch")) == str(best_epoch):
            return {m: float(row[f"val/{m}"]) for m in METRICS if row.get(f"val/{m}")}
    return {}


def reusable_runs(path: Optional[str], data: Any, epochs: Mapping[str, int], overrides: Sequence[str],
                  seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """Runs of ``path`` (another benchmark's results.json) that a sitting would train identically.

    The file must name the same data and its budget the same overrides; a record
    qualifies when its role is a key of ``epochs`` with the same epochs and its
    seed is in ``seeds`` (the role names ``plain`` and ``teacher`` mean the same
    configs in every benchmark of a testbed). Records without val metrics get
    them from their run folder (:func:`with_val_metrics`).
    """
    from mtkd.errors import MtkdError

    if not path:
        return []
    p = Path(path)
    if not p.is_file():
        raise MtkdError(f"--reuse {path}: not found")
    payload = json.loads(p.read_text())
    if str(payload.get("data")) != str(data):
        raise MtkdError(f"--reuse {path}: its runs used data {payload.get('data')}, this sitting {data}")
    if list(payload.get("budget", {}).get("overrides", [])) != list(overrides):
        raise MtkdError(f"--reuse {path}: its runs used overrides {payload.get('budget', {}).get('overrides')}, "
                        f"this sitting {list(overrides)}")
    return [with_val_metrics(r) for r in payload.get("runs", []) if r.get("role") in epochs
            and int(r["seed"]) in {int(s) for s in seeds} and r.get("epochs") == epochs[r["role"]]]


def reusable_e_runs(path: Optional[str], data: Any, epochs: Mapping[str, int], overrides: Sequence[str],
                    seeds: Sequence[int]) -> List[Dict[str, Any]]:
    """:func:`reusable_runs` that also takes a ``<role>@2x`` run at the asked epochs as ``<role>``.

    ``plateau`` names a config's run at twice its epochs ``plain@2x`` /
    ``teacher@2x``: trained with the same config at the same epochs, it is
    another sitting's ``plain`` / ``teacher`` run at those epochs (renamed,
    with ``reused_role`` naming its old role). A direct run of a seed comes
    before a renamed one, so a caller that keeps the first run per seed keeps it.
    """
    doubled = {f"{m}@2x": ep for m, ep in epochs.items()}
    out = []
    for rec in reusable_runs(path, data, {**epochs, **doubled}, overrides, seeds):
        role = rec["role"]
        if role in doubled:
            rec = dict(rec, role=role[:-len("@2x")], reused_role=role)
        out.append(rec)
    out.sort(key=lambda r: "reused_role" in r)
    return out


def with_val_metrics(rec: Dict[str, Any]) -> Dict[str, Any]:
    """``rec`` with its best epoch's val metrics, read from its run folder when the record lacks them.

    The run folder is ``out``, or for a teacher record that names only its
    ``checkpoint``, the checkpoint's; its ``test_metrics.json`` gives the best epoch.
    """
    if any(k.startswith("val_") for k in rec):
        return rec
    run_dir = Path(rec["out"]) if rec.get("out") else Path(rec["checkpoint"]).parent if rec.get("checkpoint") else None
    report = run_dir / "test_metrics.json" if run_dir is not None else None
    if report is None or not report.is_file():
        return rec
    best = json.loads(report.read_text()).get("best_epoch")
    return dict(rec, **{f"val_{k}": v for k, v in best_val_metrics(run_dir, best).items()})


def record_from_dir(role: str, seed: int, run_dir: str | Path, **extra: Any) -> Dict[str, Any]:
    """The record of a finished run folder (reads ``<run_dir>/test_metrics.json``)."""
    from mtkd.errors import MtkdError

    path = Path(run_dir) / "test_metrics.json"
    if not path.is_file():
        raise MtkdError(f"{path}: not found; the run in {run_dir} has not finished")
    return make_record(role, seed, json.loads(path.read_text()), out=run_dir, **extra)


def run_record(role: str, config: str | Path, seed: int, out: str | Path,
               overrides: Sequence[str] = (), **budget: Any) -> Dict[str, Any]:
    """:func:`run_config` then :func:`make_record`; ``budget`` = epochs/max_steps/time_budget_s.

    The record also gets ``total_s``: wall-clock of the whole call (build,
    training, validation, test).
    """
    t0 = time.perf_counter()
    report = run_config(config, overrides, seed=seed, out=out, **budget)
    return make_record(role, seed, report, out=out, total_s=time.perf_counter() - t0)


def random_checkpoint(path: str | Path, model_cfg: Mapping[str, Any], classes: Sequence[str],
                      seed: int = 0) -> Path:
    """Save a randomly initialised mtkd model as a checkpoint ``teacher.ckpt`` accepts.

    For cost measurements (step times) where the teacher's weights do not
    matter, and for tests. Holds ``model`` (state dict), ``classes`` and
    ``config.model``; loads with ``weights_only=True``.
    """
    import torch

    from mtkd.checkpoint import save_atomic
    from mtkd.models import build_model

    torch.manual_seed(seed)
    model = build_model(dict(model_cfg), len(classes))
    save_atomic({"model": model.state_dict(), "classes": list(classes),
                 "config": {"model": dict(model_cfg)}}, path)
    return Path(path)


# -- statistics ---------------------------------------------------------------------------------
def _values(runs: Iterable[Mapping[str, Any]], role: str, key: str) -> List[float]:
    return [float(r[key]) for r in runs if r["role"] == role and isinstance(r.get(key), (int, float))]


def roles_of(runs: Iterable[Mapping[str, Any]]) -> List[str]:
    """Roles in first-appearance order."""
    out: List[str] = []
    for r in runs:
        if r["role"] not in out:
            out.append(r["role"])
    return out


def stats(values: Sequence[float]) -> Optional[Dict[str, float]]:
    """``{"min", "median", "max", "n"}`` of ``values`` (``None`` when empty)."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def summarize(runs: Sequence[Mapping[str, Any]],
              keys: Sequence[str] = METRICS + COST) -> Dict[str, Dict[str, Any]]:
    """``{role: {"seeds": [...], key: stats(...) or None}}`` over ``runs``."""
    out: Dict[str, Dict[str, Any]] = {}
    for role in roles_of(runs):
        entry: Dict[str, Any] = {"seeds": sorted(int(r["seed"]) for r in runs if r["role"] == role)}
        for k in keys:
            entry[k] = stats(_values(runs, role, k))
        out[role] = entry
    return out


def gap_closed(teacher: float, plain: float, student: float) -> Optional[float]:
    """Fraction of the teacher-plain gap a student closes: ``(s - p) / (t - p)``.

    1 = the student matches the teacher, 0 = no better than plain, negative =
    worse than plain, > 1 = better than the teacher. ``None`` when the gap is
    not positive (the teacher is not better, so the fraction is meaningless).
    """
    gap = teacher - plain
    if not (gap > 0) or any(math.isnan(v) for v in (teacher, plain, student)):
        return None
    return (student - plain) / gap


def median_of(runs: Sequence[Mapping[str, Any]], role: str, key: str) -> Optional[float]:
    v = _values(runs, role, key)
    return statistics.median(v) if v else None


def fmt(v: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` places, large numbers in M, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, (int, float)) and abs(v) >= 1e5:
        return f"{v / 1e6:.2f}M"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(payload: Mapping[str, Any], derived: Sequence[str] = (),
             metrics: Sequence[str] = METRICS, cost: Sequence[str] = COST) -> str:
    """The Markdown report of a results payload (``results.json``'s dict)."""
    runs = payload.get("runs", [])
    lines = [f"# {payload['benchmark']}", "",
             f"Data: `{payload.get('data')}`  ", f"Budget: `{json.dumps(payload.get('budget', {}))}`", ""]
    if runs:
        summ = summarize(runs, tuple(metrics) + tuple(cost))
        head = ["role", "seeds"] + [f"{m} min / med / max" for m in metrics] + [f"{c} (med)" for c in cost]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for role, s in summ.items():
            cells = [role, ",".join(map(str, s["seeds"]))]
            for m in metrics:
                st = s[m]
                cells.append("-" if st is None else f"{fmt(st['min'])} / {fmt(st['median'])} / {fmt(st['max'])}")
            for c in cost:
                st = s[c]
                if st is not None and c == "params":  # always in millions, also below 0.1 M
                    cells.append(f"{st['median'] / 1e6:.2f}M")
                    continue
                cells.append("-" if st is None else fmt(st["median"], {"wall_s": 1, "epochs": 0, "steps": 0}.get(c, 3)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if derived:
        lines += [f"- {d}" for d in derived] + [""]
    return "\n".join(lines)


# -- results files ------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Results:
    """``<out>/results.json`` + ``results.md`` of one benchmark, resumable.

    An existing ``results.json`` is loaded and its runs kept; ``data`` and
    ``budget`` are updated to this sitting's values, and a record for the same
    ``(role, seed)`` replaces the old one. ``extra`` keys (e.g. ``teacher``)
    are stored at the top level of the JSON. ``metrics`` (min/median/max
    columns) and ``cost`` (median columns) choose the Markdown table's
    columns; the defaults fit training runs.
    """

    def __init__(self, out: str | Path, benchmark: str, data: Any = None,
                 budget: Optional[Mapping[str, Any]] = None, metrics: Sequence[str] = METRICS,
                 cost: Sequence[str] = COST, **extra: Any):
        self.metrics, self.cost = tuple(metrics), tuple(cost)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "results.json"
        self.md_path = self.out / "results.md"
        old: Dict[str, Any] = {}
        if self.json_path.is_file():
            old = json.loads(self.json_path.read_text())
        self.payload: Dict[str, Any] = dict(old)
        self.payload.update({"benchmark": benchmark, "data": str(data) if data is not None else old.get("data"),
                             "budget": dict(budget or old.get("budget", {}))})
        self.payload.update(extra)
        self.payload.setdefault("runs", [])
        self.derived: List[str] = list(old.get("derived", []))

    @property
    def runs(self) -> List[Dict[str, Any]]:
        return self.payload["runs"]

    def run_dir(self, role: str, seed: int) -> Path:
        """Where a run of ``(role, seed)`` trains: ``<out>/runs/<role>_s<seed>`` ('@' -> '_at_')."""
        return self.out / "runs" / f"{role.replace('@', '_at_')}_s{int(seed)}"

    def get(self, role: str, seed: int) -> Optional[Dict[str, Any]]:
        for r in self.runs:
            if r["role"] == role and int(r["seed"]) == int(seed):
                return r
        return None

    def has(self, role: str, seed: int) -> bool:
        return self.get(role, seed) is not None

    def add(self, record: Mapping[str, Any], write: bool = True) -> None:
        """Insert (or replace the same ``(role, seed)``) and rewrite the files."""
        rec = dict(record)
        self.payload["runs"] = [r for r in self.runs
                                if not (r["role"] == rec["role"] and int(r["seed"]) == int(rec["seed"]))]
        self.runs.append(rec)
        if write:
            self.write()

    def finish(self, derived: Sequence[str], **extra: Any) -> Dict[str, Any]:
        """The sitting's last :meth:`write`; prints the derived lines and where the files are."""
        self.write(derived=derived, **extra)
        print("\n".join(derived))
        print(f"[{self.payload['benchmark']}] wrote {self.json_path} and {self.md_path}", flush=True)
        return self.payload

    def write(self, derived: Optional[Sequence[str]] = None, **extra: Any) -> None:
        """Write ``results.json`` and ``results.md``; ``derived`` lines go into both."""
        if derived is not None:
            self.derived = list(derived)
        self.payload.update(extra)
        self.payload["derived"] = self.derived
        _atomic_write(self.json_path, json.dumps(self.payload, indent=2, default=str) + "\n")
        _atomic_write(self.md_path, markdown(self.payload, self.derived, self.metrics, self.cost))


def write_results(out: str | Path, benchmark: str, data: Any, budget: Mapping[str, Any],
                  runs: Sequence[Mapping[str, Any]], derived: Sequence[str] = (),
                  metrics: Sequence[str] = METRICS, cost: Sequence[str] = COST, **extra: Any) -> Path:
    """One-shot: write ``results.json``/``results.md`` with exactly ``runs``; returns the JSON path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": benchmark, "data": str(data), "budget": dict(budget),
               "runs": [dict(r) for r in runs], **extra, "derived": list(derived)}
    _atomic_write(out / "results.json", json.dumps(payload, indent=2, default=str) + "\n")
    _atomic_write(out / "results.md", markdown(payload, derived, metrics, cost))
    return out / "results.json"


# -- step timing --------------------------------------------------------------------------------
def cli(main: Any, name: str) -> None:
    """Run a benchmark's ``main()`` from the command line: bad input (an
    :class:`mtkd.errors.MtkdError`) ends with one line naming it, not a traceback."""
    import sys

    from mtkd.errors import MtkdError

    try:
        main()
    except MtkdError as exc:
        sys.exit(f"[{name}] error: {exc}")


def build_trainer(config: str | Path, overrides: Sequence[str] = (), seed: int = 0) -> Any:
    """A built (not fitted) :class:`mtkd.engine.trainer.Trainer` of ``config``: data,
    model, teacher, losses and optimizer ready, so ``train_step(batch)`` can be timed.
    Writes nothing (no run folder is created until ``fit``)."""
    from mtkd.engine.config import load_config
    from mtkd.engine.trainer import Trainer

    cfg = load_config(config, list(overrides) + [f"seed={int(seed)}"])
    trainer = Trainer(cfg)
    trainer.build()
    return trainer


def take_batches(loader: Iterable[Any], n: int) -> List[Any]:
    """The first ``n`` batches of a loader (fewer when it is shorter)."""
    out: List[Any] = []
    for batch in loader:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def interleaved_times(fns: Mapping[str, Any], batches: Sequence[Any], repeats: int,
                      warmup: int = 1) -> Dict[str, List[List[float]]]:
    """Seconds of ``fn(batch)`` per name, ``[repeat][batch]``, measured side by side.

    Within each repeat every batch is run by every function in turn, the
    order of the functions rotating from batch to batch, so slow drifts of
    the machine (another process, thermal state) hit all of them alike.
    ``warmup`` untimed passes over the first batch come first (allocator,
    lazy init). Each call gets a shallow copy of the batch dict.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name](dict(batches[0]))
    times: Dict[str, List[List[float]]] = {n: [] for n in names}
    for _ in range(repeats):
        row: Dict[str, List[float]] = {n: [] for n in names}
        for i, batch in enumerate(batches):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                fns[name](dict(batch))
                row[name].append(time.perf_counter() - t0)
        for n in names:
            times[n].append(row[n])
    return times
